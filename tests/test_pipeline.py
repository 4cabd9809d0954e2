"""The quickstart pipeline end to end at toy size: every stage, its artifacts and the results."""

import json
import subprocess
import sys

import pytest

from saferlhf.run import read_summary

STAGES = (
    "sft",
    "reward_single",
    "reward_dual",
    "cost",
    "moderation",
    "ppo_single",
    "ppo_lag",
    "evaluate",
)


@pytest.mark.slow
def test_saferlhf_without_a_task_runs_every_stage_and_gathers_the_results(tmp_path):
    toy = [
        "logger=csv",
        "trainer.enable_progress_bar=false",
        "data.benchmark.num_train=300",
        "data.benchmark.num_test=60",
        "algo.iterations=3",
        "algo.rollout_batch_size=16",
        "algo.minibatch_size=8",
        'task.stages.0.overrides=["task=sft","task.max_epochs=1"]',
        f"hydra.run.dir={tmp_path}",
    ]
    result = subprocess.run(
        [sys.executable, "-m", "saferlhf.cli", *toy], capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr[-3000:]
    summary = read_summary(tmp_path)
    assert summary["task"] == "pipeline"
    for stage in STAGES:
        assert (tmp_path / stage / "summary.json").exists(), stage
    artifacts = summary["artifacts"]
    for name in (
        "sft/policy",
        "reward_dual/reward",
        "cost/cost",
        "moderation/moderation",
        "ppo_lag/policy",
    ):
        assert (tmp_path / artifacts[name] / "config.json").exists(), name
    metrics = summary["metrics"]
    assert "ppo_lag/lagrange/lambda" in metrics and "ppo_single/lagrange/lambda" not in metrics
    assert "evaluate/winrate/harmlessness/ppo_lag_vs_sft" in metrics
    assert (tmp_path / "training_curves.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "evaluate" / "eval_table.md").exists()
    assert json.loads((tmp_path / "pipeline_artifacts.json").read_text()) == artifacts
    # Every artifact path is printed for the user.
    assert all(path in result.stdout for path in artifacts.values())

    # Rerunning into the same dir reuses the finished stages instead of training again.
    again = subprocess.run(
        [sys.executable, "-m", "saferlhf.cli", *toy], capture_output=True, text=True, cwd=tmp_path
    )
    assert (
        again.returncode == 0
        and again.stdout.count("already done") + again.stderr.count("already done") == 8
    )
