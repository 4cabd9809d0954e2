"""``saferlhf task=pipeline``: run the stages of ``task.stages`` in order, in one process.

Each stage is composed from the same config tree with the user's own overrides, then the
stage's overrides, then ``init.*`` paths to the artifacts of earlier stages; it runs in
``<run dir>/<stage>/`` with its own logger run and ``summary.json``. The pipeline's
``summary.json`` gathers every stage's metrics (as ``<stage>/<metric>``) and artifacts.

Every stage's config is validated before the first stage runs. Rerun into the same run dir, a
stage is reused when it finished (its summary.json is valid JSON) under the same resolved
config (its config.yaml) up to ``REUSE_IGNORES``, and no stage it takes artifacts from reran;
otherwise it reruns and the log says why, naming the first differing key. With
``ckpt_path=last`` an unfinished stage with the same config resumes from its last.ckpt.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Collection, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

import yaml
from hydra import compose
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from rich.console import Console

from saferlhf.config import config_leaves, validate_config
from saferlhf.errors import ConfigError
from saferlhf.run import RunContext, TaskResult, read_summary

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
        and (stage_dir / "checkpoints" / "last.ckpt").is_file()
    )
    return StageState(why, resumable)


def pipeline_task(run: RunContext) -> TaskResult:
    from saferlhf.cli import run as run_stage  # the same entry every single-task run goes through

    if run.cfg.ckpt_path not in (None, "last"):
        raise ConfigError(
            f"ckpt_path={run.cfg.ckpt_path!r}: a pipeline resumes its stages with ckpt_path=last"
        )
    console = Console()
    user = _user_overrides()
    for stage in run.cfg.task.stages:  # refuse a bad value before the first stage trains
        validate_config(compose(config_name="config", overrides=[*user, *stage.overrides]))
    artifacts: dict[str, dict[str, str]] = {}
    metrics: dict[str, float] = {}
    reran: set[str] = set()
    for stage in run.cfg.task.stages:
        stage_dir = run.run_dir / stage.name
        console.rule(f"[bold]stage {stage.name}")
        overrides = [*user, *stage_overrides(stage, artifacts)]
        stage_cfg = compose(config_name="config", overrides=overrides)
        state = stage_state(stage, stage_dir, stage_cfg, reran)
        if not state.why:
            log.info("stage %s already done in %s; reusing it", stage.name, stage_dir)
        else:
            if run.cfg.ckpt_path == "last" and state.resumable:
                log.info("stage %s: resuming it from its last.ckpt in %s", stage.name, stage_dir)
                stage_cfg = compose(config_name="config", overrides=[*overrides, "ckpt_path=last"])
            elif stage_dir.exists():
                log.warning(
                    "stage %s: running it again in %s: %s", stage.name, stage_dir, state.why
                )
            run_stage(stage_cfg, stage_dir)
            reran.add(stage.name)
        summary = read_summary(stage_dir)
        artifacts[stage.name] = summary["artifacts"]
        metrics |= {f"{stage.name}/{name}": value for name, value in summary["metrics"].items()}

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
