"""The RLHF pipeline's command-line entry (jpeft.rlhf.pipeline.main): each stage end to end on a
tiny configuration, reading what the earlier stages wrote to the run folder and writing its own
deltas (jpeft.save) and a results line."""

import json

import numpy as np
import pytest

import jpeft
from jpeft.rlhf import pipeline, preferences

TINY = ["--length", "16", "--new-tokens", "4", "--num-layers", "1", "--batch", "8",
        "--base-steps", "2", "--sft-steps", "2", "--classifier-steps", "2",
        "--classifier-train", "32", "--classifier-dev", "16", "--classifier-seq", "16",
        "--pair-prompts", "16", "--min-gap", "0", "--reward-steps", "2",
        "--ppo-iterations", "2", "--ppo-batch", "8", "--ppo-epochs", "1", "--dpo-steps", "2",
        "--eval-prompts", "4"]


@pytest.mark.slow
def test_each_stage_runs_end_to_end_and_writes_its_outputs(tmp_path, capsys):
    out = tmp_path / "run"
    results = tmp_path / "results.jsonl"
    common = ["--out", str(out), "--results", str(results)] + TINY
    with pytest.raises(SystemExit, match=r"run --stage sft first"):
        pipeline.main(["--stage", "ppo"] + common)
    for stage in pipeline.STAGES:
        assert pipeline.main(["--stage", stage] + common) == 0
    for name in ("run.json", "base", "sft", "classifier", "pairs.npz", "reward/lora",
                 "reward/head", "ppo/actor", "ppo/critic/lora", "ppo/critic/head", "dpo"):
        assert (out / name).exists(), name
    lines = [json.loads(x) for x in results.read_text().splitlines()]
    assert [x["stages"] for x in lines] == [[s] for s in pipeline.STAGES]
    by_stage = {x["stages"][0]: x for x in lines}
    ppo, dpo = by_stage["ppo"]["ppo"], by_stage["dpo"]["dpo"]
    for r in (ppo, dpo):
        assert {"reward_before", "reward_after", "rm_before", "rm_after", "kl_after"} <= set(r)
        assert 0 <= r["reward_after"] <= 1 and r["kl_before"] == pytest.approx(0, abs=1e-6)
    assert ppo["seconds_per_iteration"] > 0 and ppo["iterations"] == 2
    mem = ppo["memory"]
    assert mem["one_base_total_bytes"] < mem["four_copies_bytes"]
    assert mem["step_argument_bytes"] < 2 * mem["base_bytes"]
    assert "results ppo: reward (P positive)" in capsys.readouterr().out

    # What the stages wrote loads back by name on the base (the run folder's own readers).
    run = pipeline.Run(out, pipeline.DEFAULTS, set(), log=lambda _: None)
    assert run.settings["num_layers"] == 1 and run.settings["new_tokens"] == 4
    base = run.rlhf_base()
    actor = run.load("ppo/actor", base.params, base.sites, "ppo")
    critic = run.load_scalar("ppo/critic", base, "ppo")
    assert jpeft.num_params(actor) == jpeft.num_params(critic["lora"])
    assert critic["head"]["kernel"].shape == (base.config.hidden_size, 1)
    pairs = preferences.load_pairs(out / "pairs.npz")
    assert len(pairs) == 16 and pairs.prompt_length == 16
    assert np.all(pairs.chosen_score >= pairs.rejected_score)

    # The model settings are the folder's: another value is refused, not mixed in.
    with pytest.raises(SystemExit, match="other model settings"):
        pipeline.main(["--stage", "dpo", "--out", str(out), "--num-layers", "2"])
