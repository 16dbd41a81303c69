"""The decoder example runs end to end (tiny step counts): base, adapter, cached generation."""

from jpeft.recipes import decoder


def test_decoder_example_runs_with_prompt_tuning():
    lines = []
    r = decoder.run("prompt", base_steps=2, steps=2, length=16, batch=4, new_tokens=3,
                    log=lines.append)
    assert r.trainable == 8 * 64
    assert len(r.before) == len(r.after) == len(decoder.PROMPTS)
    assert any("loss per byte" in line for line in lines)
    assert decoder.decode(decoder.encode(["Abc"], 5)[0][0]) == "abc"
