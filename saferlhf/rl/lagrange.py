"""The Lagrange multiplier λ of PPO-Lagrangian (Safe RLHF, arXiv 2310.12773, eq. 10-11).

One class per rule, chosen by the config group ``lagrange`` (its ``name``), all with the same
interface, as OpenRLHF's KL controllers:

- ``value``: λ now, a float;
- ``record(episode_costs)``: take this iteration's episode costs (every rank's), return the
  mean episode cost J_c that the rule steps on;
- ``step(optimizer, episode_cost)``: move λ, with the optimizer from ``make_optimizer()``;
- ``make_optimizer()``: the optimizer for λ's parameters, ``None`` when λ has none;
- ``update_per``: when PPO calls ``step``: once per iteration or before every minibatch.

PPO runs the same code for every rule; only λ's trajectory differs.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque

import torch
import torch.distributed as dist
from omegaconf import DictConfig
from torch import nn

from saferlhf.errors import ConfigError
from saferlhf.losses import clamp_log_lambda_, lagrange_loss


def _from_every_rank(values: torch.Tensor) -> torch.Tensor:
    """``values`` of every rank, concatenated (this rank's alone outside distributed runs)."""
    values = values.detach().float()
    if dist.is_available() and dist.is_initialized():
        gathered = [torch.empty_like(values) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, values)
        values = torch.cat(gathered)
    return values


class Multiplier(nn.Module, ABC):
    """The interface every rule implements (see the module docstring)."""

    name: str  # the ``lagrange.name`` that selects the rule
    update_per: str  # iteration | minibatch

    @classmethod
    @abstractmethod
    def from_config(cls, cfg: DictConfig) -> Multiplier: ...

    @property
    @abstractmethod
    def value(self) -> float: ...

    @abstractmethod
    def record(self, episode_costs: torch.Tensor) -> float: ...

    @abstractmethod
    def step(self, optimizer: torch.optim.Optimizer | None, episode_cost: float) -> None: ...

    @abstractmethod
    def make_optimizer(self) -> torch.optim.Optimizer | None: ...


class SafeRLHFMultiplier(Multiplier):
    """λ = exp(log λ), moved by SGD on ``-(J_c - d)·λ`` where J_c is the mean episode cost of a
    window of recent episodes from every rank (``lagrange=safe_rlhf``).

    The window and the step count are part of ``state_dict`` so a resumed run continues with
    the same λ trajectory; the optimizer (plain SGD) is checkpointed by the Trainer.
    """

    name = "safe_rlhf"

    def __init__(
        self,
        lambda_init: float,
        lambda_lr: float,
        lambda_max: float,
        cost_limit: float,
        window: int,
        update_delay: int,
        update_per: str,
    ):
        super().__init__()
        self.log_lambda = nn.Parameter(torch.tensor(math.log(lambda_init)))
        self.lambda_lr, self.lambda_max, self.cost_limit = lambda_lr, lambda_max, cost_limit
        self.update_delay, self.update_per = update_delay, update_per
        self.window: deque[float] = deque(maxlen=window)
        self.updates_seen = 0

    @classmethod
    def from_config(cls, cfg: DictConfig) -> SafeRLHFMultiplier:
        return cls(
            cfg.lambda_init,
            cfg.lambda_lr,
            cfg.lambda_max,
            cfg.cost_limit,
            cfg.window,
            cfg.update_delay,
            cfg.update_per,
        )

    @property
    def value(self) -> float:
        return self.log_lambda.exp().item()

    def record(self, episode_costs: torch.Tensor) -> float:
        """Add this iteration's episode costs (all ranks' when distributed); return J_c."""
        self.window.extend(_from_every_rank(episode_costs).tolist())
        return sum(self.window) / len(self.window)

    def step(self, optimizer: torch.optim.Optimizer, episode_cost: float) -> None:
        """One SGD step on log λ (after ``update_delay`` calls), then clamp λ at ``lambda_max``.

        Every rank computes the same loss from the same gathered window, so λ stays identical
        on every rank without a gradient all-reduce.
        """
        self.updates_seen += 1
        if self.updates_seen <= self.update_delay:
            return
        optimizer.zero_grad()
        lagrange_loss(self.log_lambda, episode_cost, self.cost_limit).backward()
        optimizer.step()
        clamp_log_lambda_(self.log_lambda, self.lambda_max)

    def make_optimizer(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lambda_lr)

    def get_extra_state(self) -> dict:
        return {"window": list(self.window), "updates_seen": self.updates_seen}

    def set_extra_state(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.updates_seen = state["updates_seen"]


class FixedMultiplier(Multiplier):
    """λ given and never moved (``lagrange=fixed``); J_c is this iteration's mean cost."""

    name = "fixed"
    update_per = "iteration"

    def __init__(self, lambda_value: float):
        super().__init__()
        self.lambda_value = lambda_value

    @classmethod
    def from_config(cls, cfg: DictConfig) -> FixedMultiplier:
        if cfg.lambda_value < 0:
            raise ConfigError(f"lagrange.lambda_value={cfg.lambda_value}: λ must be >= 0")
        return cls(cfg.lambda_value)

    @property
    def value(self) -> float:
        return self.lambda_value

    def record(self, episode_costs: torch.Tensor) -> float:
        return _from_every_rank(episode_costs).mean().item()

    def step(self, optimizer: None, episode_cost: float) -> None:
        """λ does not move."""

    def make_optimizer(self) -> None:
        return None


RULES: dict[str, type[Multiplier]] = {
    rule.name: rule for rule in (SafeRLHFMultiplier, FixedMultiplier)
}


def multiplier_from_config(cfg: DictConfig) -> Multiplier:
    """The rule named by ``cfg.name`` (the ``lagrange`` config group), set up from ``cfg``."""
    return RULES[cfg.name].from_config(cfg)
