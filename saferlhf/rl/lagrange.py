"""The Lagrange multiplier of PPO-Lagrangian (Safe RLHF, arXiv 2310.12773, eq. 10-11)."""

from __future__ import annotations

import math
from collections import deque

import torch
import torch.distributed as dist
from torch import nn

from saferlhf.losses import clamp_log_lambda_, lagrange_loss


class LagrangeMultiplier(nn.Module):
    """λ = exp(log λ), moved by SGD on ``-(J_c - d)·λ`` where J_c is the mean episode cost of a
    window of recent episodes from every rank.

    The window and the step count are part of ``state_dict`` so a resumed run continues with
    the same λ trajectory; the optimizer (plain SGD) is checkpointed by the Trainer.
    """

    def __init__(
        self,
        lambda_init: float,
        lambda_max: float,
        cost_limit: float,
        window: int,
        update_delay: int,
    ):
        super().__init__()
        self.log_lambda = nn.Parameter(torch.tensor(math.log(lambda_init)))
        self.lambda_max, self.cost_limit, self.update_delay = lambda_max, cost_limit, update_delay
        self.window: deque[float] = deque(maxlen=window)
        self.updates_seen = 0

    @property
    def value(self) -> float:
        return self.log_lambda.exp().item()

    def record(self, episode_costs: torch.Tensor) -> float:
        """Add this iteration's episode costs (all ranks' when distributed); return J_c."""
        costs = episode_costs.detach().float()
        if dist.is_available() and dist.is_initialized():
            gathered = [torch.empty_like(costs) for _ in range(dist.get_world_size())]
            dist.all_gather(gathered, costs)
            costs = torch.cat(gathered)
        self.window.extend(costs.tolist())
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

    def get_extra_state(self) -> dict:
        return {"window": list(self.window), "updates_seen": self.updates_seen}

    def set_extra_state(self, state: dict) -> None:
        self.window.clear()
        self.window.extend(state["window"])
        self.updates_seen = state["updates_seen"]
