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
        "task.workers=2",  # side by side, each stage in its own process
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


# -- stages side by side ------------------------------------------------------------------------

TWO_REPORTS = (
    'task.stages=[{name:small,overrides:["task=data_report","task.plot=false",'
    '"data.benchmark.num_train=20"]},{name:large,overrides:["task=data_report",'
    '"task.plot=false","data.benchmark.num_train=40"]}]'
)


def _pipeline(run_dir, *overrides):
    return subprocess.run(
        [
            sys.executable, "-m", "saferlhf.cli", "logger=none", "data.benchmark.num_test=10",
            *overrides, f"hydra.run.dir={run_dir}",
        ],
        capture_output=True, text=True, cwd=run_dir.parent, timeout=600,
    )  # fmt: skip


@pytest.mark.slow
def test_stages_side_by_side_give_what_they_give_in_order_and_overlap_in_time(tmp_path):
    in_order = _pipeline(tmp_path / "in_order", TWO_REPORTS, "task.workers=1")
    side_by_side = _pipeline(tmp_path / "side_by_side", TWO_REPORTS, "task.workers=2")
    assert in_order.returncode == 0 and side_by_side.returncode == 0, side_by_side.stderr[-3000:]
    assert (
        read_summary(tmp_path / "in_order")["metrics"]
        == read_summary(tmp_path / "side_by_side")["metrics"]
    )
    small, large = json.loads((tmp_path / "side_by_side" / "timeline.json").read_text())
    assert {small["stage"], large["stage"]} == {"small", "large"}
    assert max(small["start"], large["start"]) < min(small["end"], large["end"])
    # Each ran in its own process with one torch thread (two workers, two or fewer cores).
    config = (tmp_path / "side_by_side" / "small" / "config.yaml").read_text()
    assert "num_threads: 1" in config
    assert (tmp_path / "side_by_side" / "small" / "stage.log").exists()
    # Forked from the pipeline, each stage logs to its own cli.log, not to the pipeline's.
    assert "saferlhf.cli" in (tmp_path / "side_by_side" / "small" / "cli.log").read_text()
    pipeline_log = (tmp_path / "side_by_side" / "cli.log").read_text()
    assert str(tmp_path / "side_by_side" / "small" / "summary.json") not in pipeline_log


@pytest.mark.slow
def test_a_stage_refused_in_its_own_process_stops_the_pipeline_naming_it(tmp_path):
    stages = (
        'task.stages=[{name:report,overrides:["task=data_report","task.plot=false"]},'
        '{name:cost,overrides:["task=cost","preference=single"]}]'
    )
    result = _pipeline(tmp_path / "run", stages, "task.workers=2", "data.benchmark.num_train=20")
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert (
        result.stderr.strip()
        .splitlines()[-1]
        .startswith(
            "saferlhf: error: stage cost: task=cost needs dual-preference data (safer_response_id)"
        )
    )
    assert not (tmp_path / "run" / "summary.json").exists()


def test_a_stage_before_its_source_is_refused_before_anything_runs(tmp_path):
    stages = (
        'task.stages=[{name:reward,overrides:["task=reward"],init:{policy:sft}},'
        '{name:sft,overrides:["task=sft"]}]'
    )
    result = _pipeline(tmp_path / "run", stages)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1] == (
        "saferlhf: error: pipeline stage 'reward' takes artifacts of stage sft, which does not "
        "come before it in task.stages"
    )
    assert not (tmp_path / "run" / "reward").exists()
