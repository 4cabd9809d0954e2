"""What every run shares: its directory, its logger, and the ``summary.json`` contract.

Lightning is imported where a logger is built, so that a refused config is reported without
waiting for torch to import.
"""

from __future__ import annotations

import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf

from saferlhf.errors import ConfigError

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import Callback
    from pytorch_lightning.loggers import Logger

log = logging.getLogger(__name__)

LOGGERS = ("wandb", "csv", "tensorboard", "none")


class Preempted(Exception):
    """The run stopped on SIGTERM; ``checkpoint`` holds its state, None when none was saved."""

    def __init__(self, checkpoint: Path | None):
        super().__init__(f"stopped by SIGTERM (checkpoint: {checkpoint})")
        self.checkpoint = checkpoint


@dataclass
class TaskResult:
    """What a task returns: flat metric names and artifact paths."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    variant: str | None = None  # which algorithm a task that has several ran, e.g. ppo's λ rule
    objective: float | None = None  # what a sweeper optimises (objective.*), when one is set


@dataclass
class RunContext:
    cfg: DictConfig
    run_dir: Path
    logger: Logger | None
    callbacks: list[Callback] = field(default_factory=list)  # extra Lightning callbacks for fit

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        if self.logger is not None:
            self.logger.log_metrics(metrics, step=step)


def job_name() -> str:
    """The job's override string (``preference=single,seed=1``), or ``default`` when it has none."""
    if not HydraConfig.initialized():
        return "default"
    return HydraConfig.get().job.override_dirname or "default"


def build_logger(cfg: DictConfig, run_dir: Path) -> Logger | None:
    """The Lightning logger named by ``cfg.logger.name``, writing into the run dir."""
    from pytorch_lightning.loggers import CSVLogger, TensorBoardLogger, WandbLogger

    logger_cfg = cfg.logger
    if logger_cfg.name == "none":
        return None
    if logger_cfg.name == "csv":
        return CSVLogger(save_dir=run_dir, name="csv")  # a resumed run adds version_1, ...
    if logger_cfg.name == "tensorboard":
        return TensorBoardLogger(save_dir=run_dir, name="tensorboard")
    if logger_cfg.name == "wandb":
        return WandbLogger(
            project=logger_cfg.project,
            entity=logger_cfg.entity,
            group=logger_cfg.group,
            name=job_name(),
            tags=list(logger_cfg.tags),
            offline=logger_cfg.offline,
            save_dir=str(run_dir),
            config=OmegaConf.to_container(cfg, resolve=True),
        )
    raise ConfigError(f"logger.name={logger_cfg.name!r}: expected one of {LOGGERS}")


def close_logger(logger: Logger | None, status: str) -> None:
    """Flush the logger; for wandb also end the run, so multirun jobs never share one."""
    from pytorch_lightning.loggers import WandbLogger

    if logger is None:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)


def write_atomically(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that a reader finds the old file or the whole new one,
    never a cut-off one (a temporary file in the same directory, then renamed over ``path``)."""
    temporary = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with temporary.open("w") as file:
            file.write(text)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    finally:
        temporary.unlink(missing_ok=True)


def write_config(cfg: DictConfig, run_dir: Path) -> Path:
    """The resolved config as ``config.yaml``: written when a run starts, so an unfinished
    run's config can be compared too (the pipeline's resume does)."""
    path = run_dir / "config.yaml"
    write_atomically(path, OmegaConf.to_yaml(cfg, resolve=True))
    return path


def json_metric(value: float | None) -> float | None:
    """A metric as strict JSON has it: an undefined one (NaN, e.g. a gold metric off the
    benchmark, or a mean over no items) becomes null, as JSON has no NaN."""
    return None if value is None or not math.isfinite(value) else value


def write_run_files(cfg: DictConfig, run_dir: Path, result: TaskResult) -> Path:
    """Write the resolved config and ``summary.json`` (task, metrics, artifacts, the variant
    when the task names one, the objective when one is set) into the run dir; summary.json is
    strict JSON, written last and atomically, so that it marks a finished run."""
    write_config(cfg, run_dir)
    metrics = {name: json_metric(value) for name, value in result.metrics.items()}
    summary = {"task": cfg.task.name, "metrics": metrics, "artifacts": result.artifacts}
    if result.variant is not None:
        summary["variant"] = result.variant
    if result.objective is not None:
        summary["objective"] = result.objective
    path = run_dir / "summary.json"
    write_atomically(path, json.dumps(summary, indent=2, sort_keys=True, allow_nan=False) + "\n")
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
