"""The ``saferlhf`` command: compose the Hydra config, validate it, seed, run the task, write
summary.json.

Exit status: 0 when the run finished (its summary.json written); 2 when a config value, an
input file or row, or an artifact was refused, or training went non-finite, with one line
``saferlhf: error: ...`` on stderr naming what to fix; 143 (128 + SIGTERM, as a shell reports a
process killed by it) when SIGTERM stopped training, after saving its state, with the command
that resumes it; 1 when Hydra refuses the command line (an unknown key, a wrong type: its
message names the key) or on a bug (with a traceback). A multirun runs every job and exits 2
when any was refused. With ``objective.metric`` set, each job returns its objective
(saferlhf.objective) to the sweeper, e.g. Optuna's (experiment=lagrange_search).

Lightning and the task's modules are imported when the task runs, so a refused config is
reported before any of them load.
"""

from __future__ import annotations

import logging
import shlex
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import urlsplit

import hydra
from hydra.core.hydra_config import HydraConfig
from hydra.types import RunMode
from omegaconf import DictConfig

from saferlhf import CONF_DIR
from saferlhf.allocator import keep_freed_memory
from saferlhf.config import register_configs, validate_config
from saferlhf.errors import UserError
from saferlhf.objective import run_objective
from saferlhf.run import (
    Preempted,
    RunContext,
    build_logger,
    close_logger,
    job_name,
    write_config,
    write_run_files,
)
from saferlhf.sweep import UnfinishedJobs
from saferlhf.tasks import get_task

if TYPE_CHECKING:
    from pytorch_lightning.callbacks import Callback

log = logging.getLogger(__name__)

EXIT_REFUSED = 2  # as saferlhf-moderate's usage errors
EXIT_SIGTERM = 128 + signal.SIGTERM

register_configs()


def run(cfg: DictConfig, run_dir: Path, callbacks: Sequence[Callback] = ()) -> dict[str, float]:
    """Run ``cfg.task`` in ``run_dir`` and return its metrics (``callbacks`` join any fit); with
    ``objective.metric`` set, summary.json also holds the run's objective (saferlhf.objective).

    The config is validated before anything loads. Every fit also stops on non-finite
    training and checkpoints on SIGTERM (raising :class:`Preempted`)."""
    validate_config(cfg)
    task = get_task(cfg.task.name)

    import torch
    from pytorch_lightning import seed_everything
    from pytorch_lightning.utilities import rank_zero_only
    from pytorch_lightning.utilities.exceptions import SIGTERMException

    from saferlhf.tasks.common import CheckpointOnSigterm, StopOnNonFinite

    keep_freed_memory()
    if cfg.num_threads:
        torch.set_num_threads(cfg.num_threads)
    seed_everything(cfg.seed, workers=True, verbose=False)
    run_dir.mkdir(parents=True, exist_ok=True)
    if rank_zero_only.rank == 0:
        # An earlier run's summary must not mark this one finished if it stops.
        (run_dir / "summary.json").unlink(missing_ok=True)
        write_config(cfg, run_dir)
    sigterm = CheckpointOnSigterm(run_dir / "checkpoints" / "last.ckpt")
    logger = build_logger(cfg, run_dir)
    status = "failed"
    try:
        result = task(RunContext(cfg, run_dir, logger, [StopOnNonFinite(), sigterm, *callbacks]))
        status = "success"
    except SIGTERMException:
        raise Preempted(sigterm.checkpoint) from None
    finally:
        close_logger(logger, status)
    # Checked before summary.json marks the run finished.
    result.objective = run_objective(cfg.objective, result.metrics)
    if rank_zero_only.rank == 0:  # under DDP every rank runs the task; one writes the summary
        summary = write_run_files(cfg, run_dir, result)
        log.info("summary: %s", summary)
    return result.metrics


def report(message: str) -> None:
    print(f"saferlhf: error: {message}", file=sys.stderr, flush=True)


def resume_command(overrides: Sequence[str], run_dir: str) -> str:
    """The command line that resumes a run from its ``checkpoints/last.ckpt``."""
    kept = [o for o in overrides if o.split("=")[0] not in ("hydra.run.dir", "ckpt_path")]
    return shlex.join(["saferlhf", *kept, f"hydra.run.dir={run_dir}", "ckpt_path=last"])


def preempted_message(stop: Preempted, overrides: Sequence[str], run_dir: str) -> str:
    if stop.checkpoint is None:
        return "stopped by SIGTERM before a checkpoint could be saved; rerun the command"
    return (
        f"stopped by SIGTERM; it resumes from {stop.checkpoint} with: "
        f"{resume_command(overrides, run_dir)}"
    )


def report_stop(stop: UserError | Preempted, overrides: Sequence[str], run_dir: str) -> int:
    """Print why the run stopped as its one ``saferlhf: error:`` line, and return the exit
    status that says so: refused, or stopped by SIGTERM (with the command that resumes it)."""
    if isinstance(stop, Preempted):
        report(preempted_message(stop, overrides, run_dir))
        return EXIT_SIGTERM
    report(str(stop))
    return EXIT_REFUSED


@hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name="config")
def _run_job(cfg: DictConfig) -> float | None:
    """One job; it returns its objective (``objective.*``) to a sweeper, None when none is set
    or the job was refused (a sweeper counts that trial failed)."""
    hydra_cfg = HydraConfig.get()
    run_dir = hydra_cfg.runtime.output_dir
    multirun = hydra_cfg.mode == RunMode.MULTIRUN
    overrides = list(hydra_cfg.overrides.task)
    try:
        # From the metrics, not summary.json: under DDP only rank 0 writes that.
        return run_objective(cfg.objective, run(cfg, Path(run_dir)))
    except UserError as error:
        if not multirun:
            raise SystemExit(report_stop(error, overrides, run_dir)) from None
        # The sweep goes on; UnfinishedJobs names this job again when the sweep ends.
        report(f"job {hydra_cfg.job.num} ({job_name()}): {error}")
        return None
    except Preempted as stop:
        raise SystemExit(report_stop(stop, overrides, run_dir)) from None


def url_with_credentials(overrides: Sequence[str]) -> str | None:
    """The first ``key=URL`` override whose URL holds a user name or password, the secret
    masked; None when there is none. Hydra records the command line in the run dir's
    ``.hydra/`` before any config check runs, so such a URL must be refused before Hydra."""
    for override in overrides:
        key, _, value = override.partition("=")
        if "://" not in value:
            continue
        parts = urlsplit(value.strip("'\""))
        if parts.username is not None or parts.password is not None:
            host = parts.netloc.rpartition("@")[2]
            return f"{key}={parts._replace(netloc='***@' + host).geturl()}"
    return None


def main() -> None:
    if (refused := url_with_credentials(sys.argv[1:])) is not None:
        report(
            f"{refused} holds a user name or password, which Hydra would write to the run dir: "
            "drop it from the URL (a judge's key goes in the environment variable "
            "task.judge.api_key_env names)"
        )
        sys.exit(EXIT_REFUSED)
    _run_job()
    if UnfinishedJobs.found:
        report(f"{len(UnfinishedJobs.found)} job(s) refused: {', '.join(UnfinishedJobs.found)}")
        sys.exit(EXIT_REFUSED)


if __name__ == "__main__":
    main()
