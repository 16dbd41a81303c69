"""The decoder example runs end to end (tiny step counts) through the CLI, and builds every method
it offers: base, adapters, cached generation."""

import pytest

from jpeft import cli
from jpeft.recipes import decoder


def test_decoder_example_runs_several_methods_through_the_cli(monkeypatch):
    """Two of the example's methods through the CLI (each method's math on the decoder is the
    contract suite's; here: the comma list, one result and one report per method)."""
    runs = []
    real = decoder.run

    def tiny(methods, **kw):
        runs.append(real(methods, **{**kw, "base_steps": 2, "steps": 2}, length=16, batch=4,
                         new_tokens=3, log=lines.append))
        return runs[-1]
    lines = []
    monkeypatch.setattr(decoder, "run", tiny)
    assert cli.main(["decoder", "--method", "prompt,lora"]) == 0
    results = runs[0]
    assert sorted(results) == ["lora", "prompt"]
    assert results["prompt"].trainable == 8 * 64
    for r in results.values():
        assert len(r.before) == len(r.after) == len(decoder.PROMPTS)
    assert sum("loss per byte" in line for line in lines) == 2
    assert decoder.decode(decoder.encode(["Abc"], 5)[0][0]) == "abc"
    with pytest.raises(ValueError, match="decoder example: unknown method 'lorra'"):
        decoder.run("lorra")


def test_every_offered_method_builds_and_rebuilds_from_its_config():
    from jpeft.methods import from_config
    for name in decoder.LR:
        method = decoder.build(name)
        assert from_config(method.config, method.data).config == method.config, name
