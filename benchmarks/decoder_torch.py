"""The Hugging Face side of the decoder benchmarks, importable without JAX: the decoder's
configuration and training settings (``decoder_cost.py`` takes them from here) and the PEFT
train step on ``transformers.LlamaForCausalLM`` (timed by ``isolated.py --model decoder`` in a
process that never imports JAX)."""

from __future__ import annotations

import warnings
from typing import Any, Callable, Sequence

import numpy as np

LR = 1e-4
WEIGHT_DECAY = 1e-4
RANK, ALPHA = 8, 16
# ~25.0M parameters: 8 x (786,432 attention + 1,572,864 MLP + 1,024 norms) + 2 x 6000 x 512 + 512.
MODEL = dict(vocab_size=6000, hidden_size=512, intermediate_size=1024, num_hidden_layers=8,
             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=2048,
             tie_word_embeddings=False)
#: Hugging Face PEFT's target modules of each configuration (``all-linear`` leaves ``lm_head``).
TARGETS = {"lora_qv": ["q_proj", "v_proj"], "lora_all_linear": "all-linear", "full": None}


def benchmark_batch(batch: int, seq: int, seed: int = 0) -> dict[str, np.ndarray]:
    """Random token ids in ``[1, vocab)`` and an all-ones mask, ``[batch, seq]`` int32."""
    rng = np.random.default_rng(seed)
    return {"input_ids": rng.integers(1, MODEL["vocab_size"], (batch, seq), dtype=np.int32),
            "attention_mask": np.ones((batch, seq), np.int32)}


def prepare(kind: str, batches: Sequence[dict[str, np.ndarray]]
            ) -> tuple[Callable[[], float], dict[str, Any]]:
    """``(run_step, info)``: PEFT's ``kind`` on a random ``LlamaForCausalLM`` of :data:`MODEL`
    (float32, SDPA attention, no dropout), next-token cross-entropy (``labels=input_ids``),
    ``AdamW(LR, WEIGHT_DECAY)``; each step takes the next batch (cycled) and returns the loss."""
    import peft
    import torch
    import transformers

    transformers.logging.set_verbosity_error()
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(
        **MODEL, attention_dropout=0.0, rms_norm_eps=1e-6))
    if TARGETS[kind] is not None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = peft.get_peft_model(model, peft.LoraConfig(
                r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=TARGETS[kind]))
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=LR, weight_decay=WEIGHT_DECAY)
    tensors = [{k: torch.from_numpy(np.asarray(v)).long() for k, v in b.items()} for b in batches]
    count = [0]

    def step() -> float:
        b = tensors[count[0] % len(tensors)]
        count[0] += 1
        opt.zero_grad(set_to_none=True)
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    labels=b["input_ids"])
        out.loss.backward()
        opt.step()
        return float(out.loss.detach())
    return step, {"torch_trainable_params": int(sum(p.numel() for p in params))}
