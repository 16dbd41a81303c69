"""BitFit (Ben Zaken et al., 2021, arXiv 2106.10199): train only the bias vectors.

``b = b_0 + delta_b`` for every selected bias (attention query/key/value/output, FFN, LayerNorm);
all weights stay frozen. On BERT-large this is about 0.08% of the parameters. The survey's variant
trains only the query bias and the FFN-intermediate bias, the two that move most: pass their module
paths as ``targets`` (for Hugging Face BERT naming, :data:`QUERY_AND_FFN_INTERMEDIATE`).

The trainable count is exactly the number of entries of the selected biases.
"""

from __future__ import annotations

from typing import Sequence

from jpeft.core import additive
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib

#: The survey's subset (query bias and FFN-intermediate bias) in Hugging Face BERT naming.
QUERY_AND_FFN_INTERMEDIATE = ("attention/self/query", "intermediate/dense")


def bitfit(targets: paths_lib.Targets = None, *,
           bias_names: Sequence[str] = ("bias",),
           layers_to_transform: int | Sequence[int] | None = None,
           layers_pattern: str | None = None,
           exclude: paths_lib.Targets = ()) -> method_lib.Method:
    """BitFit on the biases of the modules selected by ``targets`` (``None``: every bias).

    Args:
      targets: module paths whose bias is trained (see :mod:`jpeft.core.paths`); ``None`` = all,
        LayerNorm biases included.
      bias_names: leaf names that count as biases.
      layers_to_transform, layers_pattern, exclude: further narrow the selection.

    Raises (at ``init``):
      ValueError: if the model has no bias at all, or no bias matches ``targets``.
    """
    sel = paths_lib.Selection(targets=targets, leaf_names=tuple(bias_names),
                              layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude)
    config = {"method": "bitfit", "targets": targets, "bias_names": list(bias_names),
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "exclude": exclude}
    return additive.additive_method("bitfit", sel, config)
