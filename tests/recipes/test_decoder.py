"""The decoder example runs end to end (tiny step counts) through the CLI, on an NF4 base
(``--quantize nf4``: the float base is the same code with the quantization step left out), and
builds every method it offers: base, adapters, cached generation."""

import pytest

from jpeft import cli
from jpeft.recipes import decoder


def test_decoder_example_runs_through_the_cli(monkeypatch):
    """The example end to end through the CLI with one method (each method's math on the decoder
    is the contract suite's), and a comma list reaching ``run`` as a list."""
    runs, lines = [], []
    real = decoder.run

    def tiny(methods, **kw):
        assert (kw["temperature"], kw["top_k"]) == (0.8, 20)      # the CLI's sampling defaults
        runs.append((methods, real(methods[:1], **{**kw, "base_steps": 2, "steps": 2},
                                   length=16, batch=4, new_tokens=3, log=lines.append)))
        return runs[-1][1]
    monkeypatch.setattr(decoder, "run", tiny)
    assert cli.main(["decoder", "--method", "prompt,lora", "--quantize", "nf4"]) == 0
    methods, results = runs[0]
    assert methods == ["prompt", "lora"] and list(results) == ["prompt"]
    # --quantize reaches the example: the adapter trained on the NF4 base, both losses reported.
    assert any(line.startswith("base stored nf4: its 14 linear weights take") for line in lines)
    assert sum("full-precision base" in line and "nf4 base" in line for line in lines) == 1
    assert results["prompt"].trainable == 8 * 64
    assert len(results["prompt"].before) == len(results["prompt"].after) == len(decoder.PROMPTS)
    assert sum("trainable parameters" in line and "loss per byte" in line for line in lines) == 1
    assert decoder.decode(decoder.encode(["Abc"], 5)[0][0]) == "abc"
    with pytest.raises(ValueError, match="decoder example: unknown method 'lorra'"):
        real("lorra")
    for flags in (["--top-k", "300"], ["--temperature", "-1"]):       # refused before training
        with pytest.raises(SystemExit):
            cli.main(["decoder", *flags])
    assert len(runs) == 1


def test_sampled_continuations_share_their_draws_before_and_after():
    """The same key before and after: with the adapter's learning rate tiny the adapted model is
    nearly the base, and so are its sampled continuations, which are not the greedy ones."""
    kw = dict(base_steps=2, steps=2, length=16, batch=4, new_tokens=6, log=lambda _: None)
    sampled = decoder.run("lora", lr=1e-12, **kw)["lora"]
    assert sampled.after == sampled.before
    greedy = decoder.run("lora", lr=1e-12, temperature=0.0, **kw)["lora"]
    assert greedy.after == greedy.before and greedy.before != sampled.before


def test_every_offered_method_builds_and_rebuilds_from_its_config():
    from jpeft.methods import from_config
    for name in decoder.LR:
        method = decoder.build(name)
        assert from_config(method.config, method.data).config == method.config, name
