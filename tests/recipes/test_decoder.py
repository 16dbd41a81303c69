"""The decoder example runs end to end (tiny step counts) for every method it offers, through the
CLI: base, adapters, cached generation."""

import pytest

from jpeft import cli
from jpeft.recipes import decoder


def test_decoder_example_runs_every_method_through_the_cli(monkeypatch):
    runs = []
    real = decoder.run

    def tiny(methods, **kw):
        runs.append(real(methods, **{**kw, "base_steps": 2, "steps": 2}, length=16, batch=4,
                         new_tokens=3, log=lines.append))
        return runs[-1]
    lines = []
    monkeypatch.setattr(decoder, "run", tiny)
    assert cli.main(["decoder", "--method", ",".join(sorted(decoder.LR))]) == 0
    results = runs[0]
    assert sorted(results) == sorted(decoder.LR)
    assert results["prompt"].trainable == 8 * 64
    for r in results.values():
        assert len(r.before) == len(r.after) == len(decoder.PROMPTS)
    assert sum("loss per byte" in line for line in lines) == len(decoder.LR)
    assert decoder.decode(decoder.encode(["Abc"], 5)[0][0]) == "abc"
    with pytest.raises(ValueError, match="decoder example: unknown method 'lorra'"):
        decoder.run("lorra")
