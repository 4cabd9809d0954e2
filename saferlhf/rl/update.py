"""The PPO update: optimizers and learning-rate schedules, and one minibatch's actor and
critic steps on the clipped losses of :mod:`saferlhf.losses`."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from saferlhf.data.module import LanguageModelingCollator
from saferlhf.losses import combined_advantages, ppo_clip_loss, value_clip_loss
from saferlhf.rl.experience import Experience
from saferlhf.rl.rollout import Rollout, response_log_probs, token_values
from saferlhf.tasks.common import cosine_with_warmup
from saferlhf.tasks.sft import response_nll

# One optimizer step of the named network on a loss (the LightningModule's, which owns them).
OptimizerStep = Callable[[str, torch.Tensor], None]


def lr_multiplier(schedule: str, total_steps: int, warmup_ratio: float) -> Callable[[int], float]:
    """The learning-rate factor at each optimizer step of a network that takes
    ``total_steps``: 1 throughout (``constant``), or a linear warm-up over
    ``int(warmup_ratio · total_steps)`` steps, then a cosine decay to 0 (``cosine``)."""
    if schedule == "constant":
        return lambda step: 1.0
    if schedule == "cosine":
        warmup_steps = int(warmup_ratio * total_steps)
        return lambda step: cosine_with_warmup(step, warmup_steps, total_steps)
    raise ValueError(f"learning-rate schedule {schedule!r}: expected constant or cosine")


def make_optimizers(
    actor: PreTrainedModel,
    reward_critic: PreTrainedModel,
    cost_critic: PreTrainedModel | None,
    algo,
    ptx_separate: bool,
) -> tuple[dict[str, torch.optim.Optimizer], list[torch.optim.lr_scheduler.LambdaLR]]:
    """AdamW on each trained network's trainable parameters and its learning-rate schedule,
    sized to the optimizer steps that network takes in the whole run (the actor twice per
    minibatch with ``ptx_separate``)."""
    a = algo
    updates = a.iterations * a.ppo_epochs * math.ceil(a.rollout_batch_size / a.minibatch_size)
    actor_steps = 2 * updates if ptx_separate else updates
    networks = {  # name: (model, learning rate, schedule, optimizer steps in the whole run)
        "actor": (actor, a.actor_lr, a.actor_lr_schedule, actor_steps),
        "reward_critic": (reward_critic, a.critic_lr, a.critic_lr_schedule, updates),
    }
    if cost_critic is not None:
        networks["cost_critic"] = (cost_critic, a.critic_lr, a.critic_lr_schedule, updates)
    optimizers, schedules = {}, []
    for name, (model, lr, schedule, steps) in networks.items():
        trainable = [p for p in model.parameters() if p.requires_grad]  # LoRA: adapters
        optimizers[name] = torch.optim.AdamW(
            trainable, lr=lr, betas=tuple(a.adam_betas), weight_decay=a.weight_decay, fused=True
        )
        schedules.append(
            torch.optim.lr_scheduler.LambdaLR(
                optimizers[name], lr_multiplier(schedule, steps, a.warmup_ratio)
            )
        )
    return optimizers, schedules


@dataclass
class Minibatch:
    """Some rows of a rollout, trimmed to their own longest prompt and response, with their
    per-token experience trimmed alike; ``advantages`` are the actor's (reward and cost
    combined by λ when there is a cost)."""

    rollout: Rollout
    old_logprobs: torch.Tensor
    advantages: torch.Tensor
    old_reward_values: torch.Tensor
    reward_returns: torch.Tensor
    old_cost_values: torch.Tensor | None
    cost_returns: torch.Tensor | None


def select_minibatch(
    rollout: Rollout, experience: Experience, rows: torch.Tensor, lambda_value: float | None
) -> Minibatch:
    """The minibatch of ``rows``; ``lambda_value`` is None without a cost."""
    trimmed = rollout.select(rows).trimmed()
    cells = (rows, slice(None, trimmed.response_mask.shape[1]))
    advantages = experience.reward_advantages[cells]
    cost_values = cost_returns = None
    if lambda_value is not None:
        advantages = combined_advantages(
            advantages, experience.cost_advantages[cells], lambda_value
        )
        cost_values, cost_returns = experience.cost_values[cells], experience.cost_returns[cells]
    return Minibatch(
        trimmed, experience.old_logprobs[cells], advantages, experience.reward_values[cells],
        experience.reward_returns[cells], cost_values, cost_returns,
    )  # fmt: skip


class PtxLoss:
    """The SFT loss (mean token NLL) of the actor on a random batch of the train
    conversations: ptx, which keeps the policy close to its SFT data."""

    def __init__(
        self, examples: Sequence, batch_size: int, pad_token_id: int, pack_length: int | None
    ):
        self.examples, self.batch_size = examples, batch_size
        self.collate = LanguageModelingCollator(pad_token_id, pack_length)

    def __call__(self, actor: PreTrainedModel, device: torch.device) -> torch.Tensor:
        picks = torch.randint(len(self.examples), (self.batch_size,)).tolist()
        batch = self.collate([(self.examples[i], 1.0) for i in picks])
        nll, tokens = response_nll(actor, {k: v.to(device) for k, v in batch.items()})
        return nll / tokens.clamp(min=1)


def update_actor(
    actor: PreTrainedModel, mb: Minibatch, algo, ptx: PtxLoss | None, step: OptimizerStep
) -> dict[str, float]:
    """One step on the clipped surrogate, the ptx loss added to it (``algo.ptx_mode=joint``)
    or taken as a second step at the updated weights (``separate``); the step's metrics.
    ``algo.packed_rollouts`` and ``algo.logprob_chunk`` choose how the log-probs are computed
    (:func:`~saferlhf.rl.rollout.response_log_probs`), not what they are."""
    logprobs = response_log_probs(
        actor, mb.rollout, packed=algo.packed_rollouts, chunk_tokens=algo.logprob_chunk
    )
    clip = ppo_clip_loss(
        logprobs,
        mb.old_logprobs,
        mb.advantages,
        mb.rollout.response_mask,
        algo.clip_range,
        aggregation=algo.loss_aggregation,
    )
    metrics = {
        "train/actor_loss": clip.loss.item(),
        "train/clip_fraction": clip.clip_fraction.item(),
        "train/approx_kl": clip.approx_kl.item(),
    }
    loss = clip.loss
    if ptx is not None and algo.ptx_mode == "joint":
        ptx_loss = ptx(actor, mb.rollout.input_ids.device)
        metrics["train/ptx_loss"] = ptx_loss.item()
        loss = loss + algo.ptx_coef * ptx_loss
    step("actor", loss)
    if ptx is not None and algo.ptx_mode == "separate":
        ptx_loss = ptx(actor, mb.rollout.input_ids.device)
        metrics["train/ptx_loss"] = ptx_loss.item()
        step("actor", algo.ptx_coef * ptx_loss)
    return metrics


def update_critics(
    reward_critic: PreTrainedModel,
    cost_critic: PreTrainedModel | None,
    mb: Minibatch,
    algo,
    step: OptimizerStep,
) -> dict[str, float]:
    """One step of each critic on its clipped value loss; the losses as metrics. The critics
    run on packed rows with ``algo.packed_rollouts``."""
    critics = {"reward": (reward_critic, mb.old_reward_values, mb.reward_returns)}
    if cost_critic is not None:
        critics["cost"] = (cost_critic, mb.old_cost_values, mb.cost_returns)
    metrics = {}
    for name, (critic, old_values, returns) in critics.items():
        value = value_clip_loss(
            token_values(critic, mb.rollout, packed=algo.packed_rollouts),
            old_values,
            returns,
            mb.rollout.response_mask,
            algo.value_clip_range,
            aggregation=algo.loss_aggregation,
        )
        step(f"{name}_critic", value.loss)
        metrics[f"train/{name}_value_loss"] = value.loss.item()
    return metrics
