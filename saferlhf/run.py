"""What every run shares: its directory, its logger, and the ``summary.json`` contract."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.loggers import CSVLogger, Logger, TensorBoardLogger, WandbLogger

log = logging.getLogger(__name__)

LOGGERS = ("wandb", "csv", "tensorboard", "none")


@dataclass
class TaskResult:
    """What a task returns: flat metric names and artifact paths."""

    metrics: dict[str, float] = field(default_factory=dict)
    artifacts: dict[str, str] = field(default_factory=dict)
    variant: str | None = None  # which algorithm a task that has several ran, e.g. ppo's λ rule


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
    raise ValueError(f"logger.name={logger_cfg.name!r}: expected one of {LOGGERS}")


def close_logger(logger: Logger | None, status: str) -> None:
    """Flush the logger; for wandb also end the run, so multirun jobs never share one."""
    if logger is None:
        return
    logger.finalize(status)
    if isinstance(logger, WandbLogger):
        import wandb

        wandb.finish(exit_code=0 if status == "success" else 1)


def write_run_files(cfg: DictConfig, run_dir: Path, result: TaskResult) -> Path:
    """Write the resolved config and ``summary.json`` (task, metrics, artifacts, and the variant
    when the task names one) into the run dir."""
    OmegaConf.save(cfg, run_dir / "config.yaml", resolve=True)
    summary = {"task": cfg.task.name, "metrics": result.metrics, "artifacts": result.artifacts}
    if result.variant is not None:
        summary["variant"] = result.variant
    path = run_dir / "summary.json"
    path.write_text(json.dumps(summary, indent=2, sort_keys=True) + "\n")
    return path


def read_summary(run_dir: str | Path) -> dict[str, Any]:
    return json.loads((Path(run_dir) / "summary.json").read_text())
