"""What a PPO update learns from, made once per rollout: the frozen models' scores, the
critics' values, and the KL-shaped per-token reward and cost turned into advantages by GAE."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import PreTrainedModel

from saferlhf.losses import (
    clip_scores,
    gae,
    kl_penalty,
    masked_mean,
    penalise_missing_eos,
    shaped_costs,
    shaped_rewards,
)
from saferlhf.models.sharding import inference_context
from saferlhf.rl.rollout import Rollout, response_log_probs, sequence_scores, token_values


@dataclass
class Experience:
    """One rollout's scores, values and advantages; per-token tensors are ``(B, R)`` aligned
    with ``Rollout.response_mask``, per-response ones ``(B,)``. The cost fields are None
    without a cost model (preference=single)."""

    old_logprobs: torch.Tensor  # (B, R) under the actor that sampled the rollout
    kl: torch.Tensor  # (B, R) KL penalty of each response token against the reference
    ended: torch.Tensor  # (B,) True where the response emitted EOS
    reward: torch.Tensor  # (B,) the reward model's score, before clipping
    reward_values: torch.Tensor  # (B, R)
    reward_advantages: torch.Tensor  # (B, R)
    reward_returns: torch.Tensor  # (B, R)
    cost: torch.Tensor | None
    cost_values: torch.Tensor | None
    cost_advantages: torch.Tensor | None
    cost_returns: torch.Tensor | None


@dataclass
class Scores:
    """Everything the update compares against, computed once without autograd."""

    logprobs: torch.Tensor  # (B, R)
    ref_logprobs: torch.Tensor  # (B, R)
    reward: torch.Tensor  # (B,)
    reward_values: torch.Tensor  # (B, R)
    cost: torch.Tensor | None
    cost_values: torch.Tensor | None


def score_rollout(
    rollout: Rollout,
    actor: PreTrainedModel,
    reference: PreTrainedModel | None,
    reward_model: PreTrainedModel,
    reward_critic: PreTrainedModel,
    cost_model: PreTrainedModel | None,
    cost_critic: PreTrainedModel | None,
    packed: bool = False,
) -> Scores:
    """Reference log-probs, reward and cost, and both critics' values under inference mode;
    without a ``reference`` the actor is a LoRA model whose base is the reference. ``packed``
    runs every model on the rows packed without padding (:func:`~saferlhf.rl.rollout.
    packed_rows`); the outputs are then 0 at the response layout's padding."""
    with inference_context(actor, reference, reward_model, reward_critic, cost_model, cost_critic):
        if reference is not None:
            ref_logprobs = response_log_probs(reference, rollout, packed)
        else:
            with actor.disable_adapter():
                ref_logprobs = response_log_probs(actor, rollout, packed)
        scores = Scores(
            logprobs=rollout.logprobs,  # kept while sampling: no actor pass needed
            ref_logprobs=ref_logprobs,
            reward=sequence_scores(reward_model, rollout, packed),
            reward_values=token_values(reward_critic, rollout, packed),
            cost=sequence_scores(cost_model, rollout, packed) if cost_model is not None else None,
            cost_values=(
                token_values(cost_critic, rollout, packed) if cost_critic is not None else None
            ),
        )
    # Inference tensors cannot enter autograd graphs; plain copies can.
    return Scores(
        **{name: None if value is None else value.clone() for name, value in vars(scores).items()}
    )


def ended_responses(responses: torch.Tensor, eos_token_id: int) -> torch.Tensor:
    """``(B,)`` True where a ``(B, R)`` response holds EOS: it ended before ``max_new_tokens``
    ran out. Decoding pads only after an EOS, so a pad token equal to EOS changes nothing."""
    return (responses == eos_token_id).any(-1)


def make_experience(rollout: Rollout, scores: Scores, eos_token_id: int, algo) -> Experience:
    """The reward and cost scores clamped to ±``algo.score_clip``, the reward of a response
    that never emitted EOS lowered by ``algo.missing_eos_penalty``; KL-shaped per-token reward
    and cost (``algo.kl_coef``), then GAE (``algo.gamma``, ``algo.gae_lambda``) for each."""
    mask = rollout.response_mask
    ended = ended_responses(rollout.responses, eos_token_id)
    kl = kl_penalty(scores.logprobs, scores.ref_logprobs) * mask
    reward_score = penalise_missing_eos(
        clip_scores(scores.reward, algo.score_clip), ended, algo.missing_eos_penalty
    )
    reward_advantages, reward_returns = gae(
        shaped_rewards(reward_score, kl, mask, algo.kl_coef),
        scores.reward_values,
        mask,
        algo.gamma,
        algo.gae_lambda,
    )
    cost_advantages = cost_returns = None
    if scores.cost is not None:
        cost_advantages, cost_returns = gae(
            shaped_costs(clip_scores(scores.cost, algo.score_clip), kl, mask, algo.kl_coef),
            scores.cost_values,
            mask,
            algo.gamma,
            algo.gae_lambda,
        )
    return Experience(
        scores.logprobs, kl, ended, scores.reward, scores.reward_values, reward_advantages,
        reward_returns, scores.cost, scores.cost_values, cost_advantages, cost_returns,
    )  # fmt: skip


def rollout_metrics(rollout: Rollout, experience: Experience) -> dict[str, float]:
    """The ``rollout/*`` means of one iteration's responses."""
    mask = rollout.response_mask
    metrics = {
        "rollout/reward": experience.reward.mean().item(),
        "rollout/kl": (experience.kl.sum(-1)).mean().item(),
        "rollout/entropy": masked_mean(rollout.entropy, mask).item(),
        "rollout/response_length": mask.sum(-1).mean().item(),
        "rollout/ended_rate": experience.ended.float().mean().item(),
    }
    if experience.cost is not None:
        metrics["rollout/cost"] = experience.cost.mean().item()
        metrics["rollout/unsafe_rate"] = (experience.cost > 0).float().mean().item()
    return metrics
