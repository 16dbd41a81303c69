"""jpeft: parameter-efficient fine-tuning for JAX and Flax, as pure parameter-tree transforms."""

from jpeft import checkpoint
from jpeft import nnx
from jpeft.core import sparse
from jpeft.core.method import Context, Method, compose, wrap
from jpeft.core.paths import Selection, select
from jpeft.core.sharding import (delta_shardings, opt_state_shardings, shard_by_rules,
                                 shardings_of)
from jpeft.core.sites import Contraction, Sites, probe
from jpeft.core.train import init_opt_state, make_train_step, partition
from jpeft.core.sparse import SparseDelta, sparse_finetune, top_k_indices
from jpeft.core.tree import ParamReport, combine, num_bytes, num_params, param_report, split
from jpeft.methods.adalora import adalora, adalora_optimizer, orthogonality_penalty, rank_pattern
from jpeft.methods.bitfit import bitfit
from jpeft.methods.diff_pruning import diff_pruning
from jpeft.methods.far import (FarReport, far, far_magnitude_scores, far_pack, far_report,
                               far_scores, far_select, far_stored_like, far_unpack)
from jpeft.methods.fishmask import fisher_information, fishmask, fishmask_indices
from jpeft.methods.full import full_finetune
from jpeft.methods.intrinsic import did, said
from jpeft.methods.lora import lora

__version__ = "0.1.0"

__all__ = [
    "Context", "Contraction", "Method", "ParamReport", "Selection", "Sites", "adalora", "adalora_optimizer", "bitfit", "checkpoint", "combine", "compose",
    "delta_shardings", "did", "diff_pruning", "FarReport", "far", "far_magnitude_scores", "far_pack", "far_report",
    "far_scores", "far_select", "far_stored_like", "far_unpack", "fisher_information", "fishmask",
    "fishmask_indices", "full_finetune", "init_opt_state", "lora", "make_train_step", "nnx", "num_bytes",
    "num_params", "opt_state_shardings", "orthogonality_penalty", "param_report", "partition",
    "probe", "rank_pattern", "said", "sparse", "SparseDelta", "sparse_finetune", "top_k_indices", "select", "shard_by_rules",
    "shardings_of", "split", "wrap",
]
