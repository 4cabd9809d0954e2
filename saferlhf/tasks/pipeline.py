"""``saferlhf task=pipeline``: run the stages of ``task.stages`` in order, in one process.

Each stage is composed from the same config tree with the user's own overrides, then the
stage's overrides, then ``init.*`` paths to the artifacts of earlier stages; it runs in
``<run dir>/<stage>/`` with its own logger run and ``summary.json``. The pipeline's
``summary.json`` gathers every stage's metrics (as ``<stage>/<metric>``) and artifacts.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from hydra import compose
from hydra.core.hydra_config import HydraConfig
from rich.console import Console

from saferlhf.run import RunContext, TaskResult, read_summary

log = logging.getLogger(__name__)

# User overrides that belong to the pipeline itself, not to its stages.
_PIPELINE_ONLY = ("task", "hydra", "ckpt_path")


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
        raise ValueError(
            f"pipeline stage {stage!r} needs the {key!r} artifact of stage {source!r}, run before it"
        )
    return artifacts[source][key]


def pipeline_task(run: RunContext) -> TaskResult:
    from saferlhf.cli import run as run_stage  # the same entry every single-task run goes through

    console = Console()
    user = _user_overrides()
    artifacts: dict[str, dict[str, str]] = {}
    metrics: dict[str, float] = {}
    for stage in run.cfg.task.stages:
        stage_dir = run.run_dir / stage.name
        console.rule(f"[bold]stage {stage.name}")
        stage_cfg = compose(
            config_name="config", overrides=[*user, *stage_overrides(stage, artifacts)]
        )
        if (stage_dir / "summary.json").exists():  # finished in an earlier, interrupted run
            log.info("stage %s already done in %s; reusing it", stage.name, stage_dir)
        else:
            run_stage(stage_cfg, stage_dir)
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
    fig, axes = plt.subplots(1, len(curves), figsize=(4 * len(curves), 3.2), squeeze=False)
    for ax, (key, title) in zip(axes[0], curves, strict=True):
        for stage, history in histories.items():
            points = [(h["iteration"], h[key]) for h in history if key in h]
            if points:
                ax.plot(*zip(*points, strict=True), label=stage)
        ax.set_title(title)
        ax.set_xlabel("PPO iteration")
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
