"""Hydra callbacks for multiruns (``hydra.callbacks``), reading every job's run dir when the
sweep ends, so that they work alike for any sweeper (Hydra's grid, Optuna) and any launcher
(in this process, or Submitit's on a cluster, where a job's return value and its refusal stay
in another process):

- :class:`UnfinishedJobs` (every multirun): the jobs that left no summary.json, so that the
  ``saferlhf`` command exits non-zero naming them;
- :class:`SweepReport` (experiment=lagrange_search): ``trials.csv`` in the sweep dir, one row
  per job with the overrides that vary between jobs, ``objective.metric``,
  ``objective.constraint`` and the objective, best first; the table and the best trial printed.
"""

from __future__ import annotations

import csv
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import yaml
from hydra.experimental.callback import Callback
from omegaconf import DictConfig
from rich.console import Console
from rich.table import Table


@dataclass
class Job:
    number: int
    run_dir: Path
    overrides: dict[str, str]
    summary: dict[str, Any] | None  # None: refused, failed or still running


def read_jobs(sweep_dir: Path) -> list[Job]:
    """The jobs of the sweep in ``sweep_dir`` (run dirs named ``<job number>[_<overrides>]``;
    other folders are not jobs)."""
    jobs = []
    for overrides_file in sweep_dir.glob("*/.hydra/overrides.yaml"):
        run_dir = overrides_file.parent.parent
        number = run_dir.name.partition("_")[0]
        if not number.isdigit():
            continue
        overrides = dict(o.partition("=")[::2] for o in yaml.safe_load(overrides_file.read_text()))
        summary_file = run_dir / "summary.json"
        summary = json.loads(summary_file.read_text()) if summary_file.exists() else None
        jobs.append(Job(int(number), run_dir, overrides, summary))
    return sorted(jobs, key=lambda job: job.number)


class UnfinishedJobs(Callback):
    """``found``: the last multirun's jobs that left no summary.json, as ``job N (run dir)``:
    a job launched in another process logged why in its run dir."""

    found: ClassVar[list[str]] = []

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        jobs = read_jobs(Path(config.hydra.sweep.dir))
        UnfinishedJobs.found = [f"job {j.number} ({j.run_dir})" for j in jobs if j.summary is None]


@dataclass
class Trial:
    job: int
    overrides: dict[str, str]  # only those that vary between the sweep's jobs
    status: str  # finished | unfinished
    metric: float | None = None
    constraint: float | None = None
    objective: float | None = None


def read_trials(sweep_dir: Path, objective: DictConfig) -> list[Trial]:
    """Every job of the sweep as a trial, best objective first, then the unscored ones."""
    jobs = read_jobs(sweep_dir)
    shared = set.intersection(*(set(job.overrides.items()) for job in jobs)) if jobs else set()
    trials = []
    for job in jobs:
        varying = {k: v for k, v in job.overrides.items() if (k, v) not in shared}
        if job.summary is None:
            trials.append(Trial(job.number, varying, "unfinished"))
            continue
        metrics = job.summary["metrics"]
        trials.append(
            Trial(
                job.number,
                varying,
                "finished",
                metrics.get(objective.metric),
                metrics.get(objective.constraint) if objective.constraint is not None else None,
                job.summary.get("objective"),
            )
        )
    return sorted(trials, key=lambda t: (t.objective is None, -(t.objective or 0.0), t.job))


def write_trials_csv(trials: list[Trial], objective: DictConfig, path: Path) -> None:
    keys = sorted({key for trial in trials for key in trial.overrides})
    with path.open("w", newline="") as file:
        writer = csv.writer(file)
        writer.writerow(["job", *keys, "status", *_metric_columns(objective), "objective"])
        for t in trials:
            overrides = [t.overrides.get(key, "") for key in keys]
            writer.writerow([t.job, *overrides, t.status, *_metrics(t, objective), t.objective])


def _metric_columns(objective: DictConfig) -> list[str]:
    if objective.constraint is None:
        return [objective.metric]
    return [objective.metric, f"{objective.constraint} (at most {objective.at_most:g})"]


def _metrics(trial: Trial, objective: DictConfig) -> list[float | None]:
    return [trial.metric] if objective.constraint is None else [trial.metric, trial.constraint]


def _cell(value: float | None) -> str:
    return "—" if value is None else f"{value:.3f}"


def _short(value: str) -> str:
    """A searched float as four significant digits (trials.csv keeps every digit)."""
    try:
        return f"{float(value):.4g}"
    except ValueError:
        return value


class SweepReport(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs: Any) -> None:
        # Optuna opens its SQLite study in the sweep dir before the launcher creates it.
        Path(config.hydra.sweep.dir).mkdir(parents=True, exist_ok=True)

    def on_multirun_end(self, config: DictConfig, **kwargs: Any) -> None:
        objective = config.objective
        sweep_dir = Path(config.hydra.sweep.dir)
        trials = read_trials(sweep_dir, objective)
        write_trials_csv(trials, objective, sweep_dir / "trials.csv")
        keys = sorted({key for trial in trials for key in trial.overrides})
        table = Table(title=f"{len(trials)} trials, best first ({sweep_dir / 'trials.csv'})")
        for column in ["job", *keys, "status", *_metric_columns(objective), "objective"]:
            table.add_column(column, overflow="fold")
        for t in trials:
            overrides = [_short(t.overrides.get(key, "")) for key in keys]
            cells = [_cell(value) for value in (*_metrics(t, objective), t.objective)]
            table.add_row(str(t.job), *overrides, t.status, *cells)
        console = Console(width=max(Console().width, 140))  # a pipe gets 80 columns otherwise
        console.print(table)
        if not trials or trials[0].objective is None:
            return
        best = trials[0]
        settings = " ".join(f"{k}={_short(v)}" for k, v in best.overrides.items())
        line = f"best trial: job {best.job} ({settings}): {objective.metric} {_cell(best.metric)}"
        if objective.constraint is not None:
            line += f", {objective.constraint} {_cell(best.constraint)}"
            if best.constraint > objective.at_most:
                line += f": no trial kept it at or under {objective.at_most:g}"
        console.print(line)
