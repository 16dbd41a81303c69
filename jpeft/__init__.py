"""jpeft: parameter-efficient fine-tuning for JAX and Flax, as pure parameter-tree transforms.

The top level holds the method factories and the core verbs; family-specific helpers live in
their module's namespace (``jpeft.methods.far.far_select``, ``jpeft.methods.adalora.rank_pattern``,
``jpeft.methods.fishmask.fisher_information``, ``jpeft.sparse.top_k_indices``, ...), as optax keeps
its aliases apart from its building blocks.
"""

# First, before anything computes: keep freed host memory for reuse on CPU (the process default,
# jpeft/core/host_memory.py; JPEFT_HOST_MEMORY=release keeps glibc's).
from jpeft.core import host_memory as _host_memory

_host_memory.apply_default()

from jpeft import checkpoint  # noqa: E402
from jpeft import distributed
from jpeft import lm_loss
from jpeft import lomo  # LOMO/AdaLomo: jpeft.lomo.lomo, .adalomo, .make_step
from jpeft import methods
from jpeft import multi
from jpeft import nnx
from jpeft import presets
from jpeft.core import marks
from jpeft.core import sparse
from jpeft.core.dataflow import same_derivative, weight
from jpeft.core.host_memory import retain_host_memory
from jpeft.core.marks import mark
from jpeft.core.method import Context, Method, active, compose, observe, wrap
from jpeft.core.paths import Selection, select
from jpeft.core.sharding import (delta_shardings, opt_state_shardings, shard_by_rules,
                                 shardings_of)
from jpeft.core.sites import Contraction, Sites, probe
from jpeft.core.sparse import sparse_finetune
from jpeft.core.train import (DonatedBufferError, NonFiniteError, TrainStep, init_opt_state,
                              make_train_step, method_optimizer, partition)
from jpeft.lm_loss import lm_cross_entropy
from jpeft.core.tree import (ParamReport, combine, num_bytes, num_params, param_report, split,
                              trainable_count)
from jpeft.methods.adalora import adalora
from jpeft.methods.adapters import bottleneck as bottleneck_adapter
from jpeft.methods.adapters import compacter, houlsby, pfeiffer
from jpeft.methods.adapters import mam as mam_adapter
from jpeft.methods.adapters import multihead_parallel as multihead_parallel_adapter
from jpeft.methods.adapters import parallel as parallel_adapter
from jpeft.methods.adapters import scaled_parallel as scaled_parallel_adapter
from jpeft.methods.bitfit import bitfit
from jpeft.methods.diff_pruning import diff_pruning
from jpeft.methods.far import far
from jpeft.methods.fishmask import fishmask
from jpeft.methods.full import full_finetune
from jpeft.methods.ia3 import ia3
from jpeft.methods.intrinsic import did, said
from jpeft.methods import parts
from jpeft.methods.lora import lora
from jpeft.methods.prefix import prefix_tuning
from jpeft.methods.prompt import prompt_tuning
from jpeft.methods.sparse_adapter import sparse_adapter
from jpeft.methods.unipelt import unipelt
from jpeft.ops.quantize import QuantizedArray
from jpeft.quantized import dequantize_params, dequantizing, quantize_params
from jpeft.saving import Loaded, load, save

__version__ = "0.1.0"

__all__ = [
    # methods
    "adalora", "bitfit", "bottleneck_adapter", "compacter", "did", "diff_pruning", "far",
    "fishmask", "full_finetune", "houlsby", "ia3", "lora", "mam_adapter",
    "multihead_parallel_adapter", "parallel_adapter", "pfeiffer", "prefix_tuning",
    "prompt_tuning", "said", "scaled_parallel_adapter", "sparse_adapter", "sparse_finetune",
    "unipelt",
    # core verbs
    "active", "combine", "compose", "delta_shardings", "dequantize_params", "dequantizing",
    "init_opt_state", "lm_cross_entropy", "make_train_step", "mark", "method_optimizer", "num_bytes", "num_params",
    "observe", "opt_state_shardings", "param_report", "partition", "parts", "probe",
    "quantize_params",
    "retain_host_memory", "same_derivative", "select", "shard_by_rules", "shardings_of", "split",
    "trainable_count", "weight", "NonFiniteError", "DonatedBufferError", "TrainStep", "load",
    "save", "Loaded", "wrap",
    # types and namespaces
    "Context", "Contraction", "Method", "ParamReport", "QuantizedArray", "Selection", "Sites",
    "checkpoint", "distributed", "lm_loss", "lomo", "marks", "methods", "multi", "nnx", "presets",
    "sparse",
]
