"""The Lagrange multiplier λ of PPO-Lagrangian (Safe RLHF, arXiv 2310.12773, eq. 10-11).

A rule is one :class:`Multiplier` subclass registered with ``@register_rule(name)``, plus
``conf/lagrange/<name>.yaml`` (``defaults: [<name>_schema]`` and its values); ``lagrange=<name>``
then picks it. Its keys are a nested ``Config`` dataclass, a subclass of
:class:`saferlhf.config.LagrangeConfig`, which the decorator stores in Hydra's ConfigStore as
``lagrange/<name>_schema``, so the YAML and every override are type-checked; the stored schema
sets ``name`` and admits no other. All rules have the same interface, as OpenRLHF's KL
controllers:

- ``from_config(cfg)``: the rule set up from its ``lagrange`` node;
- ``value``: λ now, a float;
- ``record(episode_costs)``: take this iteration's episode costs (every rank's), return the
  mean episode cost J_c that the rule steps on;
- ``step(optimizer, episode_cost)``: move λ, with the optimizer from ``make_optimizer()``;
- ``make_optimizer()``: the optimizer for λ's parameters, ``None`` when λ has none;
- ``update_per``: when PPO calls ``step``: once per iteration or before every minibatch.

A rule that steps against the threshold d keeps it as ``cost_limit``; with
``lagrange.cost_limit_from=safe_responses`` PPO sets it at the start of training to
``lagrange.cost_limit`` plus the cost model's mean cost of safe responses (:func:`mean_cost`).

PPO runs the same code for every rule; only λ's trajectory differs, and ``summary.json`` names
the rule as the run's ``variant``.
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, make_dataclass
from enum import StrEnum
from typing import ClassVar, TypeVar

import torch
import torch.distributed as dist
from hydra.core.config_store import ConfigStore
from omegaconf import MISSING, DictConfig
from torch import nn

from saferlhf.config import LagrangeConfig
from saferlhf.data.collate import pad_sequences
from saferlhf.errors import ConfigError
from saferlhf.losses import clamp_log_lambda_, lagrange_loss
from saferlhf.models.sharding import inference_context


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

    name: ClassVar[str]  # the ``lagrange.name`` that selects the rule, set by register_rule
    Config: ClassVar[type[LagrangeConfig]]  # the rule's keys
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


RULES: dict[str, type[Multiplier]] = {}  # lagrange.name -> rule, filled by register_rule

Rule = TypeVar("Rule", bound=type[Multiplier])


def register_rule(name: str) -> Callable[[Rule], Rule]:
    """Class decorator: ``lagrange=<name>`` picks the rule, and its ``Config`` is stored in
    Hydra's ConfigStore as ``lagrange/<name>_schema``, which ``conf/lagrange/<name>.yaml``
    starts from."""

    def register(rule: Rule) -> Rule:
        if RULES.get(name, rule) is not rule:
            raise ValueError(f"λ rule name {name!r} is taken by {RULES[name].__qualname__}")
        if not issubclass(rule.Config, LagrangeConfig):
            raise TypeError(f"{rule.__qualname__}.Config: expected a LagrangeConfig subclass")
        rule.name = name
        ConfigStore.instance().store(
            group="lagrange", name=f"{name}_schema", node=_schema_pinned_to_its_name(rule)
        )
        RULES[name] = rule
        return rule

    return register


def _schema_pinned_to_its_name(rule: type[Multiplier]) -> type[LagrangeConfig]:
    """``rule.Config`` with ``name`` a one-member enum, defaulting to the rule's name: a node that
    names another rule, whose keys it does not have, is refused when the config is composed.

    The enum and the schema are attributes of the rule, named as such, so that configs holding
    them pickle."""
    qualname = f"{rule.__qualname__}.Name"
    rule.Name = StrEnum(qualname, [rule.name], module=rule.__module__, qualname=qualname)
    rule.Schema = make_dataclass(
        rule.Config.__qualname__,  # what a refusal names
        [("name", rule.Name, field(default=rule.Name(rule.name)))],
        bases=(rule.Config,),
    )
    rule.Schema.__module__ = rule.__module__
    rule.Schema.__qualname__ = f"{rule.__qualname__}.Schema"
    return rule.Schema


class LambdaUpdatePer(StrEnum):
    iteration = "iteration"  # one λ step per PPO iteration
    minibatch = "minibatch"  # one λ step before every update minibatch (as Safe RLHF)


@register_rule("safe_rlhf")
class SafeRLHFMultiplier(Multiplier):
    """λ = exp(log λ), moved by SGD on ``-(J_c - d)·λ`` where J_c is the mean episode cost of a
    window of recent episodes from every rank (``lagrange=safe_rlhf``).

    The window and the step count are part of ``state_dict`` so a resumed run continues with
    the same λ trajectory; the optimizer (plain SGD) is checkpointed by the Trainer.
    """

    @dataclass
    class Config(LagrangeConfig):
        lambda_init: float = MISSING
        lambda_lr: float = MISSING
        lambda_max: float = MISSING
        window: int = MISSING  # recent episodes whose mean cost drives λ
        update_delay: int = MISSING  # λ steps skipped at the start
        update_per: LambdaUpdatePer = MISSING

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


@register_rule("fixed")
class FixedMultiplier(Multiplier):
    """λ given and never moved (``lagrange=fixed``); J_c is this iteration's mean cost."""

    @dataclass
    class Config(LagrangeConfig):
        lambda_value: float = MISSING  # λ throughout; 0: PPO on the reward alone, with both critics

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


# Safe responses whose mean cost sets d under lagrange.cost_limit_from=safe_responses: the first
# this many of the train split. The tiny cost model's costs of safe answers spread with a
# standard deviation near 1, so the mean is good to a few hundredths.
SAFE_RESPONSES_SCORED = 1024


def mean_cost(
    cost_model: nn.Module, sequences: list[list[int]], pad_token_id: int, batch_size: int
) -> float:
    """The cost model's mean score of tokenized conversations, right-padded as it was trained,
    ``batch_size`` at a time. Every rank scores the same sequences, so d is the same on all."""
    total = 0.0
    with inference_context(cost_model):
        for start in range(0, len(sequences), batch_size):
            input_ids, attention_mask = pad_sequences(
                sequences[start : start + batch_size], pad_token_id, side="right"
            )
            scores = cost_model(
                input_ids=input_ids.to(cost_model.device),
                attention_mask=attention_mask.to(cost_model.device),
                use_cache=False,
            ).logits
            total += scores.float().sum().item()
    return total / len(sequences)


def multiplier_from_config(cfg: DictConfig) -> Multiplier:
    """The rule named by ``cfg.name`` (the ``lagrange`` config group), set up from ``cfg``."""
    if cfg.name not in RULES:
        raise ConfigError(f"lagrange.name={cfg.name!r}: expected one of {sorted(RULES)}")
    return RULES[cfg.name].from_config(cfg)
