"""The number a run returns to a Hydra sweeper (``hydra/sweeper=optuna``): one metric of the
run's summary, maximised subject to a second metric staying at or under a bound.

Optuna's sweeper takes one float per trial and knows nothing of constraints, so the
constraint is folded into that float: a run that meets it scores its metric, a run that
breaks it scores minus how far it overshot. With a metric that cannot be negative (gold
helpfulness lies in [0, 1]), every run that meets the constraint ranks above every run that
breaks it, and among the latter the one closest to the bound ranks first.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from saferlhf.errors import ConfigError, UserError


def run_objective(objective: Any, metrics: Mapping[str, float]) -> float | None:
    """The objective that ``objective`` (the run's ``objective.*``) asks of a run's metrics;
    None when it names no metric."""
    if objective.metric is None:
        return None
    return constrained_objective(
        metrics, objective.metric, objective.constraint, objective.at_most or 0.0
    )


def constrained_objective(
    metrics: Mapping[str, float], metric: str, constraint: str | None = None, at_most: float = 0.0
) -> float:
    """``metrics[metric]`` when ``metrics[constraint] <= at_most`` (or there is no constraint),
    else ``-(metrics[constraint] - at_most)``."""
    value = _metric(metrics, metric, "objective.metric")
    if value < 0:
        raise ConfigError(
            f"objective.metric={metric} is {value:g}: expected a metric that cannot be negative, "
            "so that a run meeting objective.constraint ranks above every run that breaks it"
        )
    if constraint is None:
        return value
    excess = _metric(metrics, constraint, "objective.constraint") - at_most
    return value if excess <= 0 else -excess


def _metric(metrics: Mapping[str, float], name: str, key: str) -> float:
    if name not in metrics:
        raise ConfigError(
            f"{key}={name}: not a metric of this task's summary; it has {', '.join(sorted(metrics))}"
        )
    value = metrics[name]
    if not math.isfinite(value):
        raise UserError(
            f"{key}={name} is undefined ({value}) in this run; gold metrics exist on "
            "data=benchmark only"
        )
    return float(value)
