"""One entry per ``task.name``: where its function lives (imported on use, so a data report
does not pay for importing the RL stack)."""

from __future__ import annotations

from collections.abc import Callable
from importlib import import_module

from saferlhf.errors import ConfigError
from saferlhf.run import RunContext, TaskResult

TASKS: dict[str, str] = {
    "data_report": "saferlhf.tasks.data_report:data_report",
    "reward": "saferlhf.tasks.score:score_task",
    "cost": "saferlhf.tasks.score:score_task",
    "evaluate_score": "saferlhf.tasks.evaluate_score:evaluate_score",
    "moderation": "saferlhf.tasks.moderation:moderation_task",
    "sft": "saferlhf.tasks.sft:sft_task",
    "ppo": "saferlhf.tasks.ppo:ppo_task",
    "dpo": "saferlhf.tasks.dpo:dpo_task",
    "evaluate": "saferlhf.tasks.evaluate:evaluate_task",
    "pipeline": "saferlhf.tasks.pipeline:pipeline_task",
    "generate": "saferlhf.tasks.generate:generate_task",
    "serve": "saferlhf.tasks.serve:serve_task",
}


def get_task(name: str) -> Callable[[RunContext], TaskResult]:
    if name not in TASKS:
        raise ConfigError(f"task.name={name!r}: expected one of {sorted(TASKS)}")
    module, function = TASKS[name].split(":")
    return getattr(import_module(module), function)
