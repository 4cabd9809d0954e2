"""The quickstart pipeline end to end at toy size: every stage, its artifacts and the results."""

import json
import subprocess
import sys

import pytest

from saferlhf.run import TaskResult, read_summary, write_run_files
from saferlhf.tasks.pipeline import first_difference, stage_state

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


# -- when a finished stage is reused ------------------------------------------------------------


def test_first_difference_names_the_first_differing_key_and_skips_ignored_ones():
    saved = {"data": {"benchmark": {"num_train": 100}}, "logger": {"name": "csv"}, "seed": 0}
    current = {"data": {"benchmark": {"num_train": 300}}, "logger": {"name": "wandb"}, "seed": 0}
    assert first_difference(saved, current, ["logger.*"]) == (
        "data.benchmark.num_train: 100 then, 300 now"
    )
    assert first_difference(saved, saved | {"logger": {"name": "x"}}, ["logger.*"]) is None
    assert first_difference({"a": 1}, {"a": 1, "b": [2]}, []) == "b.0: unset then, 2 now"


def _reward_stage(compose_cfg):
    """The quickstart's reward_dual stage: task=reward, init.policy from the sft stage."""
    return next(s for s in compose_cfg("task=pipeline").task.stages if s.name == "reward_dual")


def _finished(stage_dir, cfg):
    """The files a run under ``cfg`` leaves in ``stage_dir`` when it finishes."""
    write_run_files(cfg, stage_dir, TaskResult({"val/accuracy": 0.5}, {"reward": "R"}))


def test_a_stage_is_reused_only_under_the_same_config(compose_cfg, tmp_path):
    stage = _reward_stage(compose_cfg)
    small = "data.benchmark.num_train=100"
    cfg = compose_cfg("task=reward", small, "logger=csv", "init.policy=/run/sft/artifacts/policy")
    _finished(tmp_path, cfg)
    same = compose_cfg("task=reward", small, "logger=none", "num_threads=1", "init.policy=/sft")
    assert stage_state(stage, tmp_path, same, reran=set()).why == ""  # logging, paths: same
    changed = compose_cfg("task=reward", "data.benchmark.num_train=300", "init.policy=/x")
    why = stage_state(stage, tmp_path, changed, reran=set()).why
    assert "data.benchmark.num_train: 100 then, 300 now" in why and "config.yaml" in why
    assert "stage sft, which reran" in stage_state(stage, tmp_path, same, reran={"sft"}).why


@pytest.mark.parametrize(
    "summary", ['{"task": "reward", "metr', "", '{"task": "reward"}', "[1, 2]", "\udcff"]
)
def test_a_cut_off_or_invalid_summary_means_the_stage_did_not_finish(
    compose_cfg, tmp_path, summary
):
    cfg = compose_cfg("task=reward")
    _finished(tmp_path, cfg)
    (tmp_path / "summary.json").write_bytes(summary.encode("utf-8", "surrogateescape"))
    state = stage_state(_reward_stage(compose_cfg), tmp_path, cfg, reran=set())
    assert "summary.json" in state.why and not state.resumable
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "last.ckpt").write_bytes(b"")
    assert stage_state(_reward_stage(compose_cfg), tmp_path, cfg, reran=set()).resumable
