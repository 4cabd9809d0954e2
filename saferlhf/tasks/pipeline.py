"""``saferlhf task=pipeline``: run the stages of ``task.stages``, in order in this process
(``task.workers=1``) or up to ``task.workers`` at a time, each in a process of its own.

Each stage is composed from the same config tree with the user's own overrides, then the
stage's overrides, then ``init.*`` paths to the artifacts of earlier stages; it runs in
``<run dir>/<stage>/`` with its own logger run and ``summary.json``. The pipeline's
``summary.json`` gathers every stage's metrics (as ``<stage>/<metric>``) and artifacts.

Every stage's config is validated before the first stage runs. Rerun into the same run dir, a
stage is reused when it finished (its summary.json is valid JSON) under the same resolved
config (its config.yaml) up to ``REUSE_IGNORES``, and no stage it takes artifacts from reran;
otherwise it reruns and the log says why, naming the first differing key. With
``ckpt_path=last`` an unfinished stage with the same config resumes from its last.ckpt.

With ``task.workers`` > 1 a stage starts as soon as the stages it takes artifacts from have
finished and a worker is free, earlier stages first; each runs in its own process, forked from
this one (so it starts without importing torch and the rest again, about 10 s a stage on one
thread), with ``num_threads`` set to this run's threads divided among the workers (so that two
stages never fight over the cores), its output in ``<stage>/stage.log`` and its log in
``<stage>/cli.log``. A refused or failed stage stops the others, as SIGTERM does: they save
their state, and the pipeline's resume command picks them up. ``timeline.json`` in the run dir
says when each stage ran.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import sys
import time
import traceback
from collections.abc import Collection, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from saferlhf.config import config_leaves, validate_config
from saferlhf.errors import ConfigError, UserError
from saferlhf.run import Preempted, RunContext, TaskResult, read_summary

log = logging.getLogger(__name__)

# User overrides that belong to the pipeline itself, not to its stages (a sweep's objective
# names pipeline metrics, <stage>/<metric>).
_PIPELINE_ONLY = ("task", "hydra", "ckpt_path", "objective")

# Config keys that do not change a stage's results: where and how it logs, its CPU threads,
# how it was started and the run's name. The init paths a stage takes from earlier stages are
# left out too: the stage reruns when one of those stages reran.
REUSE_IGNORES = (
    "logger.*",
    "num_threads",
    "trainer.enable_progress_bar",
    "trainer.log_every_n_steps",
    "task.sample_every",
    "ckpt_path",
    "experiment_name",
)
_UNSET = object()


def _user_overrides() -> list[str]:
    if not HydraConfig.initialized():
        return []
    overrides = HydraConfig.get().overrides.task
    return [
        o for o in overrides if o.lstrip("+~").split("=")[0].split(".")[0] not in _PIPELINE_ONLY
    ]


def stage_overrides(stage, artifacts: dict[str, dict[str, str]]) -> list[str]:
    """The stage's own overrides plus ``init.*`` and ``task.policies.*`` paths from earlier stages."""
    overrides = list(stage.overrides)
    for key, source in stage.init.items():
        overrides.append(f"init.{key}={_artifact(artifacts, source, key, stage.name)}")
    for name, source in stage.policies.items():
        overrides.append(
            f"+task.policies.{name}={_artifact(artifacts, source, 'policy', stage.name)}"
        )
    return overrides


def _artifact(artifacts: dict[str, dict[str, str]], source: str, key: str, stage: str) -> str:
    if source not in artifacts or key not in artifacts[source]:
        raise ConfigError(
            f"pipeline stage {stage!r} needs the {key!r} artifact of stage {source!r}, run before it"
        )
    return artifacts[source][key]


def first_difference(
    saved: Mapping[str, Any], current: Mapping[str, Any], ignored: Collection[str]
) -> str | None:
    """The first dotted key (in sorted order) whose value differs between two resolved
    configs, with its two values; keys matching a pattern of ``ignored`` do not count."""
    before, now = dict(config_leaves(saved)), dict(config_leaves(current))
    for key in sorted(before.keys() | now.keys()):
        if any(fnmatchcase(key, pattern) for pattern in ignored):
            continue
        old, new = before.get(key, _UNSET), now.get(key, _UNSET)
        if old != new:
            return f"{key}: {_shown(old)} then, {_shown(new)} now"
    return None


def _shown(value: Any) -> str:
    return "unset" if value is _UNSET else repr(value)


def unfinished_reason(stage_dir: Path) -> str | None:
    """Why the run in ``stage_dir`` cannot count as finished, or None when its summary.json is
    whole (a summary cut off by a crash or a full disk counts as unfinished)."""
    path = stage_dir / "summary.json"
    if not path.exists():
        return "it has not finished"
    try:
        summary = read_summary(stage_dir)
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        return f"{path} is cut off or not JSON ({error})"
    if not isinstance(summary, dict) or not all(
        isinstance(summary.get(part), dict) for part in ("metrics", "artifacts")
    ):
        return f"{path} lacks its metrics or artifacts"
    return None


def config_difference(stage_dir: Path, cfg: DictConfig, ignored: Collection[str]) -> str | None:
    """How ``cfg`` differs from the config the run in ``stage_dir`` ran with, or None."""
    path = stage_dir / "config.yaml"
    if not path.exists():
        return f"{path} is missing"
    try:
        saved = OmegaConf.to_container(OmegaConf.load(path))
    except (OSError, UnicodeDecodeError, yaml.YAMLError) as error:
        return f"{path} cannot be read ({error})"
    current = OmegaConf.to_container(OmegaConf.create(OmegaConf.to_yaml(cfg, resolve=True)))
    difference = first_difference(saved, current, ignored)
    return f"its config differs from {path} at {difference}" if difference else None


@dataclass
class StageState:
    """What a stage's directory says about running the stage again."""

    why: str  # why it must run; empty when its results can be reused
    resumable: bool  # unfinished under the same config, with a checkpoints/last.ckpt


def stage_state(stage, stage_dir: Path, cfg: DictConfig, reran: Collection[str]) -> StageState:
    """Whether ``stage`` can be reused from ``stage_dir`` under ``cfg``, given the stages that
    ``reran`` before it. The init paths it takes from earlier stages are not compared: it
    runs again when one of those stages did."""
    ignored = [
        *REUSE_IGNORES,
        *(f"init.{key}" for key in stage.init),
        *(f"task.policies.{name}" for name in stage.policies),
    ]
    sources = sorted({*stage.init.values(), *stage.policies.values()} & set(reran))
    depends = f"it takes artifacts of stage {', '.join(sources)}, which reran" if sources else None
    unfinished = unfinished_reason(stage_dir)
    difference = config_difference(stage_dir, cfg, ignored)
    why = "; ".join(reason for reason in (depends, unfinished, difference) if reason)
    resumable = (
        unfinished is not None
        and depends is None
        and difference is None
        and (stage_dir / "checkpoints" / "last.ckpt").exists()
    )
    return StageState(why, resumable)


@dataclass
class PlannedStage:
    """A stage ready to start: its directory, overrides and composed config, and whether it
    runs (False: its earlier results are reused)."""

    stage: Any
    stage_dir: Path
    overrides: list[str]
    cfg: DictConfig
    runs: bool


def plan_stage(
    stage, run: RunContext, user: list[str], artifacts: dict[str, dict[str, str]], reran: set[str]
) -> PlannedStage:
    """Compose ``stage`` with the artifacts of the stages before it and decide, from its
    directory, whether it is reused, resumed (``ckpt_path=last``) or run again."""
    stage_dir = run.run_dir / stage.name
    overrides = [*user, *stage_overrides(stage, artifacts)]
    stage_cfg = compose(config_name="config", overrides=overrides)
    state = stage_state(stage, stage_dir, stage_cfg, reran)
    if not state.why:
        log.info("stage %s already done in %s; reusing it", stage.name, stage_dir)
        return PlannedStage(stage, stage_dir, overrides, stage_cfg, runs=False)
    if run.cfg.ckpt_path == "last" and state.resumable:
        log.info("stage %s: resuming it from its last.ckpt in %s", stage.name, stage_dir)
        overrides = [*overrides, "ckpt_path=last"]
        stage_cfg = compose(config_name="config", overrides=overrides)
    elif stage_dir.exists():
        log.warning("stage %s: running it again in %s: %s", stage.name, stage_dir, state.why)
    return PlannedStage(stage, stage_dir, overrides, stage_cfg, runs=True)


def sources(stage) -> set[str]:
    """The stages whose artifacts ``stage`` takes."""
    return {*stage.init.values(), *stage.policies.values()}


def pipeline_task(run: RunContext) -> TaskResult:
    if run.cfg.ckpt_path not in (None, "last"):
        raise ConfigError(
            f"ckpt_path={run.cfg.ckpt_path!r}: a pipeline resumes its stages with ckpt_path=last"
        )
    stages = list(run.cfg.task.stages)
    for index, stage in enumerate(stages):
        earlier = {s.name for s in stages[:index]}
        if missing := sorted(sources(stage) - earlier):
            raise ConfigError(
                f"pipeline stage {stage.name!r} takes artifacts of stage {', '.join(missing)}, "
                "which does not come before it in task.stages"
            )
    user = _user_overrides()
    for stage in stages:  # refuse a bad value before the first stage trains
        validate_config(compose(config_name="config", overrides=[*user, *stage.overrides]))
    finished = FinishedStages()
    if run.cfg.task.workers == 1:
        run_in_order(run, stages, user, finished)
    else:
        run_concurrently(run, stages, user, finished)
    (run.run_dir / "timeline.json").write_text(json.dumps(finished.timeline, indent=2) + "\n")
    plot_timeline(finished.timeline, run.run_dir / "timeline.png")
    artifacts, metrics = finished.artifacts, finished.metrics
    console = Console()
    curves = plot_training_curves(artifacts, run.run_dir / "training_curves.png")
    flat_artifacts = {
        f"{stage}/{name}": path
        for stage, paths in artifacts.items()
        for name, path in paths.items()
    }
    if curves:
        flat_artifacts["training_curves"] = str(curves)
    (run.run_dir / "pipeline_artifacts.json").write_text(
        json.dumps(flat_artifacts, indent=2) + "\n"
    )
    console.rule("[bold]artifacts")
    for name, path in flat_artifacts.items():
        console.print(f"{name}: {path}", markup=False, soft_wrap=True)
    table = run.run_dir / "evaluate" / "eval_table.md"
    if table.exists():
        console.rule("[bold]results")
        console.print(table.read_text(), markup=False, soft_wrap=True)
    return TaskResult(metrics, flat_artifacts)


@dataclass
class FinishedStages:
    """What the finished (or reused) stages left: artifacts and metrics by stage, the stages
    that ran (their dependents cannot be reused), and when each ran."""

    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    reran: set[str] = field(default_factory=set)
    timeline: list[dict[str, Any]] = field(default_factory=list)
    _start: float = field(default_factory=time.monotonic, repr=False)

    def add(self, planned: PlannedStage, started: float | None = None) -> None:
        summary = read_summary(planned.stage_dir)
        name = planned.stage.name
        self.artifacts[name] = summary["artifacts"]
        self.metrics |= {f"{name}/{metric}": value for metric, value in summary["metrics"].items()}
        if planned.runs:
            self.reran.add(name)
            self.timeline.append({"stage": name, "start": started, "end": self.elapsed()})
        else:
            self.timeline.append({"stage": name, "reused": True})

    def elapsed(self) -> float:
        return time.monotonic() - self._start


def run_in_order(run: RunContext, stages: list, user: list[str], finished: FinishedStages) -> None:
    from saferlhf.cli import run as run_stage  # the same entry every single-task run goes through

    console = Console()
    for stage in stages:
        console.rule(f"[bold]stage {stage.name}")
        planned = plan_stage(stage, run, user, finished.artifacts, finished.reran)
        started = finished.elapsed()
        if planned.runs:
            run_stage(planned.cfg, planned.stage_dir)
        finished.add(planned, started)


@dataclass
class RunningStage:
    planned: PlannedStage
    process: multiprocessing.process.BaseProcess
    started: float


def run_concurrently(
    run: RunContext, stages: list, user: list[str], finished: FinishedStages
) -> None:
    """Up to ``task.workers`` stages at a time, each in its own ``saferlhf`` process."""
    import torch

    workers = run.cfg.task.workers
    threads = max(1, torch.get_num_threads() // workers)
    user = [o for o in user if o.lstrip("+~").split("=")[0] != "num_threads"]
    user.append(f"num_threads={threads}")
    log.info("running up to %d stages at a time, %d torch thread(s) each", workers, threads)
    pending, running = list(stages), {}
    stopping = _SigtermFlag()
    try:
        while pending or running:
            while len(running) < workers and (stage := _next_ready(pending, finished.artifacts)):
                pending.remove(stage)
                planned = plan_stage(stage, run, user, finished.artifacts, finished.reran)
                if planned.runs:
                    running[stage.name] = _start(planned, finished.elapsed())
                else:
                    finished.add(planned)
            if not running:
                continue  # a reused stage made others ready
            done = _wait_for_one(running, stopping)
            if done.process.exitcode != 0:
                raise _stage_error(done)
            log.info(
                "stage %s finished in %.0f s", done.planned.stage.name,
                finished.elapsed() - done.started,
            )  # fmt: skip
            finished.add(done.planned, done.started)
    finally:
        _stop(running.values())
        stopping.restore()


def _next_ready(pending: list, artifacts: Mapping[str, Any]):
    """The first pending stage whose sources have all finished, or None."""
    return next((s for s in pending if sources(s) <= artifacts.keys()), None)


def _start(planned: PlannedStage, started: float) -> RunningStage:
    planned.stage_dir.mkdir(parents=True, exist_ok=True)
    # Forked: the child has every module this process imported. Nothing here has run a torch
    # op or touched CUDA, so no thread pool is copied half-alive into the child and the child
    # can still initialise CUDA itself.
    process = multiprocessing.get_context("fork").Process(
        target=_stage_process, args=(planned,), name=f"saferlhf-{planned.stage.name}"
    )
    process.start()
    log.info(
        "stage %s started (its output: %s)", planned.stage.name, planned.stage_dir / "stage.log"
    )
    return RunningStage(planned, process, started)


def _stage_process(planned: PlannedStage) -> None:
    """A stage's own process: the same run as ``saferlhf`` with the stage's overrides, with
    its exit status (0, 2 refused, 143 stopped by SIGTERM, 1 on a bug)."""
    from saferlhf.cli import report_stop
    from saferlhf.cli import run as run_stage

    signal.signal(signal.SIGTERM, signal.SIG_DFL)  # the pipeline's handler only sets its flag
    with (planned.stage_dir / "stage.log").open("w") as output:
        os.dup2(output.fileno(), sys.stdout.fileno())
        os.dup2(output.fileno(), sys.stderr.fileno())
    _log_to(planned.stage_dir / "cli.log")
    status = 1
    try:
        run_stage(planned.cfg, planned.stage_dir)
        status = 0
    except (UserError, Preempted) as stop:
        status = report_stop(stop, planned.overrides, str(planned.stage_dir))
    except BaseException:
        traceback.print_exc()
    finally:
        logging.shutdown()
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)  # not the pipeline's exit handlers, which the fork copied


def _log_to(path: Path) -> None:
    """Point the log files this process inherited (the pipeline's cli.log) at ``path``."""
    root = logging.getLogger()
    for handler in [h for h in root.handlers if isinstance(h, logging.FileHandler)]:
        replacement = logging.FileHandler(path)
        replacement.setFormatter(handler.formatter)
        replacement.setLevel(handler.level)
        root.removeHandler(handler)
        handler.close()
        root.addHandler(replacement)


class _SigtermFlag:
    """Turns SIGTERM into a flag the wait loop reads, so that the running stages are stopped
    (and save their state) before this process ends."""

    def __init__(self) -> None:
        self.raised = False
        self._previous = signal.signal(signal.SIGTERM, self._handle)

    def _handle(self, signum, frame) -> None:
        self.raised = True

    def restore(self) -> None:
        signal.signal(signal.SIGTERM, self._previous)


def _wait_for_one(running: dict[str, RunningStage], stopping: _SigtermFlag) -> RunningStage:
    while True:
        if stopping.raised:
            stopped = list(running.values())
            _stop(stopped)
            running.clear()
            checkpoints = [s.planned.stage_dir / "checkpoints" / "last.ckpt" for s in stopped]
            raise Preempted(next((c for c in checkpoints if c.exists()), None))
        for name, stage in running.items():
            if stage.process.exitcode is not None:
                return running.pop(name)
        time.sleep(0.2)


def _stop(stages) -> None:
    """SIGTERM every running stage and wait for it: each saves its state first."""
    for stage in stages:
        if stage.process.exitcode is None:
            stage.process.terminate()  # SIGTERM
    for stage in stages:
        stage.process.join()


def _stage_error(done: RunningStage) -> Exception:
    """The error of a stage process that failed: its own one-line message when it refused."""
    name, log_file = done.planned.stage.name, done.planned.stage_dir / "stage.log"
    lines = log_file.read_text(errors="replace").splitlines()
    refusal = next((line for line in reversed(lines) if line.startswith("saferlhf: error: ")), None)
    if refusal is not None:
        return UserError(f"stage {name}: {refusal.removeprefix('saferlhf: error: ')}")
    tail = "\n".join(lines[-20:])
    return RuntimeError(
        f"stage {name} failed (exit {done.process.exitcode}); {log_file} ends:\n{tail}"
    )


def plot_timeline(timeline: list[dict[str, Any]], path: Path) -> Path | None:
    """One bar per stage that ran, from its start to its end (seconds into the pipeline)."""
    ran = [entry for entry in timeline if not entry.get("reused")]
    if not ran:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 0.4 * len(ran) + 1))
    for row, entry in enumerate(ran):
        ax.barh(row, entry["end"] - entry["start"], left=entry["start"], color=f"C{row}")
    ax.set_yticks(range(len(ran)), [entry["stage"] for entry in ran])
    ax.invert_yaxis()
    ax.set_xlabel("seconds since the pipeline started")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


# The learned scores next to their gold counterparts: a gap that opens is reward hacking.
CURVES = (
    ("rollout/reward", "learned reward"),
    ("gold/helpfulness", "gold helpfulness"),
    ("rollout/cost", "learned cost"),
    ("gold/unsafe_or_unreadable_rate", "gold unsafe-or-unreadable rate"),
    ("lagrange/lambda", "λ"),
)


def plot_training_curves(artifacts: dict[str, dict[str, str]], path: Path) -> Path | None:
    """Learned reward and cost, their gold counterparts (on the benchmark) and λ over PPO
    iterations for every stage that wrote a PPO history."""
    histories = {
        stage: json.loads(Path(paths["history"]).read_text())
        for stage, paths in artifacts.items()
        if "history" in paths and Path(paths["history"]).exists()
    }
    if not histories:
        return None
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curves = [
        (key, title)
        for key, title in CURVES
        if any(key in h for v in histories.values() for h in v)
    ]
    colors = {stage: f"C{i}" for i, stage in enumerate(histories)}  # one per stage, every panel
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], curves, strict=True):
        for stage, history in histories.items():
            points = [(h["iteration"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), label=stage, color=colors[stage])
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
