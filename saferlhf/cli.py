"""The ``saferlhf`` command: compose the Hydra config, seed, run the task, write summary.json."""

from __future__ import annotations

import logging
from collections.abc import Sequence
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig
from pytorch_lightning import seed_everything
from pytorch_lightning.callbacks import Callback
from pytorch_lightning.utilities import rank_zero_only

from saferlhf import CONF_DIR
from saferlhf.config import register_configs
from saferlhf.run import RunContext, build_logger, close_logger, write_run_files
from saferlhf.tasks import get_task

log = logging.getLogger(__name__)

register_configs()


def run(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Run ``cfg.task`` in ``run_dir`` and return its metrics (``callbacks`` join any fit)."""
    task = get_task(cfg.task.name)
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    logger = build_logger(cfg, run_dir)
    status = "failed"
    try:
        result = task(RunContext(cfg, run_dir, logger, list(callbacks)))
        status = "success"
    finally:
        close_logger(logger, status)
    if rank_zero_only.rank == 0:  # under DDP every rank runs the task; one writes the summary
        summary = write_run_files(cfg, run_dir, result)
        log.info("summary: %s", summary)
    return result.metrics


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def main(cfg: DictConfig) -> None:
    run(cfg, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    main()
