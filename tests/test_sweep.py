"""Sweeps through Hydra's plugins: the constrained objective a run returns to a sweeper, an
Optuna search of the Lagrange hyperparameters (experiment=lagrange_search), and jobs launched
by Submitit (hydra/launcher=slurm composes; submitit_local runs jobs in other processes)."""

import csv
import json
import math
import subprocess
import sys
from pathlib import Path

import optuna
import pytest

from saferlhf.config import validate_config
from saferlhf.errors import ConfigError, UserError
from saferlhf.objective import constrained_objective
from tests.tiny import save_micro_artifacts

SAFERLHF = Path(sys.executable).with_name("saferlhf")  # the console script of this venv
QUIET = ("logger=none", "num_threads=1", "trainer.enable_progress_bar=false")
REFUSED = 2
HELP, UNSAFE = "final/gold/helpfulness", "final/gold/unsafe_or_unreadable_rate"


def test_a_run_within_the_bound_scores_its_metric_and_one_beyond_minus_its_overshoot():
    assert constrained_objective({HELP: 0.6, UNSAFE: 0.05}, HELP, UNSAFE, 0.1) == 0.6
    assert constrained_objective({HELP: 0.6, UNSAFE: 0.1}, HELP, UNSAFE, 0.1) == 0.6
    assert constrained_objective({HELP: 0.9, UNSAFE: 0.35}, HELP, UNSAFE, 0.1) == pytest.approx(
        -0.25
    )
    assert constrained_objective({HELP: 0.4}, HELP) == 0.4  # no constraint


def test_every_run_within_the_bound_ranks_above_every_run_beyond_it():
    within = [{HELP: h, UNSAFE: 0.1} for h in (0.0, 0.3)]
    beyond = [{HELP: h, UNSAFE: u} for h, u in ((1.0, 0.11), (0.9, 0.5))]
    scores = [constrained_objective(m, HELP, UNSAFE, 0.1) for m in within + beyond]
    assert min(scores[:2]) > max(scores[2:])
    assert scores[2] > scores[3]  # nearer the bound ranks higher


def test_a_metric_the_run_lacks_negative_or_undefined_is_named():
    with pytest.raises(ConfigError, match="objective.metric=final/gold/help: not a metric"):
        constrained_objective({HELP: 0.5}, "final/gold/help")
    with pytest.raises(ConfigError, match="objective.constraint=unsafe: not a metric"):
        constrained_objective({HELP: 0.5}, HELP, "unsafe", 0.1)
    with pytest.raises(ConfigError, match="objective.metric=loss is -0.5: expected a metric"):
        constrained_objective({"loss": -0.5}, "loss")
    with pytest.raises(UserError, match="objective.metric=final/gold/helpfulness is undefined"):
        constrained_objective({HELP: math.nan}, HELP)


def test_a_constraint_without_its_bound_is_refused_before_the_run(compose_cfg):
    cfg = compose_cfg(
        "task=data_report", f"objective.metric={HELP}", f"objective.constraint={UNSAFE}"
    )
    with pytest.raises(ConfigError, match="objective.constraint=.*expected objective.at_most"):
        validate_config(cfg)


def test_the_slurm_launcher_composes_from_submitit_slurm(compose_cfg):
    from hydra import compose, initialize_config_dir

    from saferlhf import CONF_DIR

    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(
            config_name="config",
            overrides=[
                "hydra/launcher=slurm",
                "hydra.launcher.partition=gpu",
                "trainer.num_nodes=2",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_.endswith("hydra_submitit_launcher.submitit_launcher.SlurmLauncher")
    assert (launcher.partition, launcher.nodes, launcher.gpus_per_node) == ("gpu", 2, 1)
    assert launcher.max_num_timeout == 0
    assert cfg.hydra.callbacks.unfinished_jobs._target_ == "saferlhf.sweep.UnfinishedJobs"


@pytest.mark.slow
def test_a_job_refused_in_a_submitit_process_makes_the_sweep_exit_non_zero(tmp_path):
    result = subprocess.run(
        [
            str(SAFERLHF), "-m", "hydra/launcher=submitit_local", *QUIET, "task=data_report",
            "task.plot=false", "data.benchmark.num_test=10", "data.benchmark.num_train=0,20",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    # The job's own message stays in its Submitit log; the sweep names it when it ends.
    assert result.returncode == REFUSED, result.stderr[-2000:]
    last_line = result.stderr.splitlines()[-1]
    assert last_line.startswith(
        f"saferlhf: error: 1 job(s) refused: job 0 ({tmp_path / 'sweep'}/0_"
    )
    assert "data.benchmark.num_train=0," in last_line
    (finished,) = (tmp_path / "sweep").glob("1_*/summary.json")
    assert json.loads(finished.read_text())["metrics"]["data/train_rows"] == 20


@pytest.mark.slow
def test_optuna_searches_the_lagrange_settings_and_reports_every_trial(tmp_path):
    artifacts = save_micro_artifacts(tmp_path / "artifacts")
    sweep_dir = tmp_path / "sweep"
    result = subprocess.run(
        [
            str(SAFERLHF), "-m", "experiment=lagrange_search", *QUIET,
            f"init.policy={artifacts / 'policy'}", f"init.reward={artifacts / 'reward'}",
            f"init.cost={artifacts / 'cost'}", "hydra.sweeper.n_trials=3", "algo.iterations=1",
            "data.benchmark.num_train=200", "data.benchmark.num_test=40",
            "algo.rollout_batch_size=8", "algo.minibatch_size=4", "algo.ptx_batch_size=4",
            "eval.sampling.max_new_tokens=8", "eval.num_prompts=8", "objective.at_most=0.5",
            f"hydra.sweep.dir={sweep_dir}",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    study = optuna.load_study(
        study_name="lagrange_search", storage=f"sqlite:///{sweep_dir}/study.db"
    )
    assert [t.state for t in study.trials] == [optuna.trial.TrialState.COMPLETE] * 3
    searched = [t.params for t in study.trials]
    assert len({p["lagrange.cost_limit"] for p in searched}) == 3
    for params in searched:
        assert 0.1 <= params["lagrange.lambda_init"] <= 5.0
        assert 0.01 <= params["lagrange.lambda_lr"] <= 0.5
        assert -7.0 <= params["lagrange.cost_limit"] <= -1.0

    with (sweep_dir / "trials.csv").open() as file:
        rows = list(csv.DictReader(file))
    assert [row["status"] for row in rows] == ["finished"] * 3
    objectives = [float(row["objective"]) for row in rows]
    assert objectives == sorted(objectives, reverse=True)
    for row in rows:  # each trial's objective is its own metrics', as the study recorded it
        summary = json.loads(next(sweep_dir.glob(f"{row['job']}/summary.json")).read_text())
        metrics = summary["metrics"]
        assert summary["objective"] == constrained_objective(metrics, HELP, UNSAFE, 0.5)
        assert float(row[HELP]) == metrics[HELP]
        assert study.trials[int(row["job"])].value == summary["objective"]
        assert (
            float(row["lagrange.cost_limit"])
            == study.trials[int(row["job"])].params["lagrange.cost_limit"]
        )
    best = rows[0]
    assert study.best_value == float(best["objective"])
    assert f"best trial: job {best['job']} (" in result.stdout


def test_the_jobs_of_a_sweep_are_read_from_its_run_dirs(tmp_path):
    from saferlhf.sweep import read_jobs

    for name, overrides, summary in (
        ("1", ["seed=1"], None),  # refused: no summary.json
        ("0_seed=0", ["seed=0"], {"task": "sft", "metrics": {}, "artifacts": {}}),
        ("notes", ["seed=9"], None),  # not a job of the sweep
    ):
        (tmp_path / name / ".hydra").mkdir(parents=True)
        (tmp_path / name / ".hydra" / "overrides.yaml").write_text(json.dumps(overrides))
        if summary is not None:
            (tmp_path / name / "summary.json").write_text(json.dumps(summary))
    jobs = read_jobs(tmp_path)
    assert [(j.number, j.overrides, j.summary is None) for j in jobs] == [
        (0, {"seed": "0"}, False),
        (1, {"seed": "1"}, True),
    ]
