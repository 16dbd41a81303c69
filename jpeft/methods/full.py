"""Full training of selected parameters: a task head, or the whole model as a baseline.

``theta = theta_0 + delta`` on every leaf under the selected modules, ``delta`` zero-initialised.
``full_finetune()`` with no targets is ordinary full fine-tuning expressed as a delta (the reference
point of the benchmarks); ``full_finetune(("classifier",))`` trains a classification head, the
counterpart of Hugging Face PEFT's ``modules_to_save``.

Note: weight decay on the delta pulls towards the initial weights, not towards zero.
"""

from __future__ import annotations

from typing import Sequence

from jpeft.core import additive
from jpeft.core import method as method_lib
from jpeft.core import paths as paths_lib


def full_finetune(targets: paths_lib.Targets = None, *,
                  leaf_names: Sequence[str] | None = None,
                  layers_to_transform: int | Sequence[int] | None = None,
                  layers_pattern: str | None = None,
                  exclude: paths_lib.Targets = (),
                  name: str = "full") -> method_lib.Method:
    """Train every leaf (or those named ``leaf_names``) of the modules matched by ``targets``."""
    sel = paths_lib.Selection(targets=targets, leaf_names=leaf_names,
                              layers_to_transform=layers_to_transform,
                              layers_pattern=layers_pattern, exclude=exclude)
    config = {"method": "full", "targets": targets, "leaf_names": leaf_names,
              "layers_to_transform": layers_to_transform, "layers_pattern": layers_pattern,
              "exclude": exclude, "name": name}
    return additive.additive_method(name, sel, config)
