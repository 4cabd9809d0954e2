"""Every loss and estimator of the pipeline, as pure tensor functions.

No module, optimizer, config or logging in here: each function takes tensors and numbers and
returns tensors (never ``.item()``), so the training modules read forward -> loss -> log and
every formula is pinned by a numeric test in ``tests/test_losses.py``.

Conventions:

- ``B`` is the batch size, ``T`` the (response) length, ``V`` the vocabulary size.
- A ``mask`` is 1/True on valid positions and 0/False on padding; float or bool. Responses are
  right-padded and start at index 0 of the ``(B, T)`` tensors. Values at masked positions are
  ignored, even when they are inf or NaN, and masked outputs are 0.
- Losses that have statistics worth logging return a NamedTuple whose first field is the loss;
  the statistics are detached.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

# ---------------------------------------------------------------------------------------------
# Masked statistics
# ---------------------------------------------------------------------------------------------


def masked_mean(values: Tensor, mask: Tensor, dim: int | None = None) -> Tensor:
    """Mean of ``values`` over the positions where ``mask`` is set.

    Args:
        values: any shape, e.g. ``(B, T)``.
        mask: same shape as ``values``, 1/True on valid positions (float or bool).
        dim: ``None`` for one mean over all valid positions; an int for a mean along that
            dimension (e.g. ``dim=1`` gives a per-row mean of shape ``(B,)``).

    Returns:
        A 0-dim tensor (``dim=None``) or ``values`` reduced along ``dim``. An empty selection
        gives 0, not NaN, so a minibatch without valid tokens contributes nothing.
    """
    mask = mask.bool()
    total = torch.where(mask, values, torch.zeros_like(values)).sum(dim=dim)
    count = mask.sum(dim=dim).clamp_min(1).to(total.dtype)
    return total / count


LOSS_AGGREGATIONS = ("token_mean", "sequence_mean")


def masked_aggregate(values: Tensor, mask: Tensor, aggregation: str) -> Tensor:
    """One number from per-token loss terms, the way ``aggregation`` weighs them.

    - ``token_mean``: ``Σ_{b,t} m_bt x_bt / Σ_{b,t} m_bt``, every valid token alike, so a long
      response weighs in proportion to its length (TRL);
    - ``sequence_mean``: ``mean_b (Σ_t m_bt x_bt / Σ_t m_bt)`` over the rows with a valid
      token, every response alike however long (Safe RLHF's ``masked_mean``).

    Args:
        values: ``(B, T)`` per-token terms.
        mask: ``(B, T)``, 1/True on valid positions.
        aggregation: ``token_mean`` or ``sequence_mean``.

    Returns:
        A 0-dim tensor; 0 when no position is valid.
    """
    if aggregation == "token_mean":
        return masked_mean(values, mask)
    if aggregation == "sequence_mean":
        mask = mask.bool()
        return masked_mean(masked_mean(values, mask, dim=-1), mask.any(dim=-1))
    raise ValueError(f"aggregation={aggregation!r}: expected one of {LOSS_AGGREGATIONS}")


# ---------------------------------------------------------------------------------------------
# Score models: reward (Bradley-Terry) and cost
# ---------------------------------------------------------------------------------------------


def bradley_terry_loss(better_scores: Tensor, worse_scores: Tensor, reg: float) -> Tensor:
    """Pairwise reward-model loss (Ouyang et al. 2022, eq. 1; Safe RLHF, Dai et al. 2023, sec. 3.2).

    ``L = mean(-log σ(r_w - r_l)) + reg · mean(r_w² + r_l²) / 2``

    The L2 term keeps the scores near 0 (their scale is otherwise free).

    Args:
        better_scores: ``(B,)`` scores ``r_w`` of the preferred responses.
        worse_scores: ``(B,)`` scores ``r_l`` of the other responses.
        reg: weight of the score regulariser.

    Returns:
        The scalar loss.
    """
    ranking = -F.logsigmoid(better_scores - worse_scores).mean()
    regulariser = reg * (better_scores**2 + worse_scores**2).mean() / 2
    return ranking + regulariser


def cost_loss(
    safer_costs: Tensor,
    unsafer_costs: Tensor,
    safer_signs: Tensor,
    unsafer_signs: Tensor,
    reg: float,
) -> Tensor:
    """Cost-model loss (Safe RLHF, Dai et al. 2023, arXiv 2310.12773, eq. 6).

    ``L = mean(-log σ(c_u - c_s)) + mean(-log σ(s_u · c_u)) + mean(-log σ(s_s · c_s))
    + reg · mean(c_s² + c_u²) / 2``

    The first term ranks the less safe response higher; the sign terms classify each
    response on its own, pushing safe costs below 0 and unsafe costs above 0, so that
    ``c > 0`` reads as "unsafe". The regulariser matches :func:`bradley_terry_loss`.

    Args:
        safer_costs: ``(B,)`` costs ``c_s`` of the safer response of each pair.
        unsafer_costs: ``(B,)`` costs ``c_u`` of the less safe response.
        safer_signs: ``(B,)`` +1 where the safer response is unsafe, -1 where it is safe
            (float or int).
        unsafer_signs: ``(B,)`` the same for the less safe response.
        reg: weight of the cost regulariser.

    Returns:
        The scalar loss.
    """
    safer_signs = safer_signs.to(safer_costs.dtype)
    unsafer_signs = unsafer_signs.to(unsafer_costs.dtype)
    ranking = -F.logsigmoid(unsafer_costs - safer_costs).mean()
    unsafer_sign_term = -F.logsigmoid(unsafer_signs * unsafer_costs).mean()
    safer_sign_term = -F.logsigmoid(safer_signs * safer_costs).mean()
    regulariser = reg * (safer_costs**2 + unsafer_costs**2).mean() / 2
    return ranking + unsafer_sign_term + safer_sign_term + regulariser


# ---------------------------------------------------------------------------------------------
# Token log-probabilities and entropy
# ---------------------------------------------------------------------------------------------


SELECTIVE_LOG_SOFTMAX_CHUNK = 2**24  # logits per logsumexp call (64 MiB in float32)


def selective_log_softmax(logits: Tensor, index: Tensor) -> Tensor:
    """Log-probabilities of the chosen tokens, without a full ``log_softmax`` copy.

    Equivalent to the naive
    ``torch.log_softmax(logits, dim=-1).gather(-1, index.unsqueeze(-1)).squeeze(-1)``, but in
    float32/float64 it computes ``logits[index] - logsumexp(logits)`` over chunks of rows of at
    most ``2**24`` logits, so the extra peak memory is one chunk instead of a second
    ``(B, T, V)`` tensor, in a few large operations rather than one per row (TRL's
    ``selective_log_softmax`` loops over rows). In half precision the logsumexp subtraction
    loses too much accuracy, so it falls back to a row-wise ``log_softmax``.

    Args:
        logits: ``(B, T, V)``.
        index: ``(B, T)`` token ids in ``[0, V)``.

    Returns:
        ``(B, T)`` log-probabilities, in ``logits``' dtype.
    """
    if logits.dtype in (torch.float32, torch.float64):
        chosen = logits.gather(dim=-1, index=index.unsqueeze(-1)).squeeze(-1)  # (B, T)
        rows_per_chunk = max(1, SELECTIVE_LOG_SOFTMAX_CHUNK // max(1, logits.shape[1:].numel()))
        chunks = logits.split(rows_per_chunk)
        normaliser = torch.cat([torch.logsumexp(chunk, dim=-1) for chunk in chunks])  # (B, T)
        return chosen - normaliser
    rows = [
        torch.log_softmax(row, dim=-1).gather(dim=-1, index=row_index.unsqueeze(-1)).squeeze(-1)
        for row, row_index in zip(logits, index, strict=True)
    ]
    return torch.stack(rows)


def chunked_token_log_probs(
    hidden: Tensor, head_weight: Tensor, index: Tensor, chunk_tokens: int
) -> Tensor:
    """Log-probabilities of the chosen tokens under a linear LM head, ``chunk_tokens`` tokens
    at a time: ``log_softmax(h_n Wᵀ)[index_n]`` for each token ``n``.

    The same numbers as :func:`selective_log_softmax` of the full logits ``hidden @ Wᵀ``
    (computed in the head's dtype, then in float32), but the ``(N, V)`` logits are never all
    held at once: each chunk's logits live only inside its own forward, and each chunk is
    checkpointed, so backward recomputes them instead of keeping ``N · V`` floats alive from
    forward to backward. Peak extra memory is one chunk's logits (and their gradient), for one
    more LM-head matmul per chunk in backward.

    Args:
        hidden: ``(N, H)`` final hidden states (after the last norm).
        head_weight: ``(V, H)`` the LM head's weight (a head without bias or logit scaling).
        index: ``(N,)`` token ids in ``[0, V)``.
        chunk_tokens: tokens per chunk, at least 1.

    Returns:
        ``(N,)`` float32 log-probabilities.
    """

    def chunk_log_probs(chunk_hidden: Tensor, weight: Tensor, chunk_index: Tensor) -> Tensor:
        return selective_log_softmax(F.linear(chunk_hidden, weight).float(), chunk_index)

    pieces = [
        checkpoint(chunk_log_probs, chunk_hidden, head_weight, chunk_index, use_reentrant=False)
        for chunk_hidden, chunk_index in zip(
            hidden.split(chunk_tokens), index.split(chunk_tokens), strict=True
        )
    ]
    return torch.cat(pieces)


def sequence_log_probs(logits: Tensor, labels: Tensor, mask: Tensor) -> Tensor:
    """Summed log-probability of each sequence's valid tokens, ``log π(y|x)`` (as DPO uses).

    ``logits`` and ``labels`` must already be aligned: ``logits[:, t]`` scores
    ``labels[:, t]``. For a causal LM pass ``logits[:, :-1]``, ``input_ids[:, 1:]`` and
    ``mask[:, 1:]``. Labels on masked positions may hold anything (e.g. -100).

    Args:
        logits: ``(B, T, V)``.
        labels: ``(B, T)`` token ids.
        mask: ``(B, T)``, 1/True on the tokens to score (the response).

    Returns:
        ``(B,)`` sums of per-token log-probabilities over the valid tokens.
    """
    mask = mask.bool()
    safe_labels = torch.where(mask, labels, torch.zeros_like(labels))
    token_logps = selective_log_softmax(logits, safe_labels)  # (B, T)
    return torch.where(mask, token_logps, torch.zeros_like(token_logps)).sum(dim=-1)


def entropy_from_logits(logits: Tensor) -> Tensor:
    """Entropy of the categorical distribution at each position.

    ``H = -Σ p log p = logsumexp(z) - Σ softmax(z) · z``, stable for large logits.
    Logits must be finite.

    Args:
        logits: ``(B, T, V)``.

    Returns:
        ``(B, T)`` entropies in nats.
    """
    probs = torch.softmax(logits, dim=-1)
    return torch.logsumexp(logits, dim=-1) - (probs * logits).sum(dim=-1)


# ---------------------------------------------------------------------------------------------
# DPO
# ---------------------------------------------------------------------------------------------


class DPOOutput(NamedTuple):
    loss: Tensor  # scalar
    chosen_rewards: Tensor  # (B,), detached: β (log π(y_w) - log π_ref(y_w))
    rejected_rewards: Tensor  # (B,), detached: β (log π(y_l) - log π_ref(y_l))


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    beta: float,
) -> DPOOutput:
    """Direct Preference Optimization loss (Rafailov et al. 2023, eq. 7).

    ``L = mean(-log σ(β [(log π(y_w) - log π_ref(y_w)) - (log π(y_l) - log π_ref(y_l))]))``

    Args:
        policy_chosen_logps: ``(B,)`` sequence log-probs of the chosen responses under the
            policy (see :func:`sequence_log_probs`).
        policy_rejected_logps: ``(B,)`` the same for the rejected responses.
        ref_chosen_logps: ``(B,)`` chosen responses under the frozen reference model.
        ref_rejected_logps: ``(B,)`` rejected responses under the reference model.
        beta: the KL strength β.

    Returns:
        ``DPOOutput(loss, chosen_rewards, rejected_rewards)``; the rewards are the implicit
        rewards ``β (log π - log π_ref)``, detached, for logging accuracies and margins.
    """
    chosen_log_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_log_ratio = policy_rejected_logps - ref_rejected_logps
    loss = -F.logsigmoid(beta * (chosen_log_ratio - rejected_log_ratio)).mean()
    return DPOOutput(
        loss=loss,
        chosen_rewards=(beta * chosen_log_ratio).detach(),
        rejected_rewards=(beta * rejected_log_ratio).detach(),
    )


# ---------------------------------------------------------------------------------------------
# PPO: reward shaping, advantages, clipped losses
# ---------------------------------------------------------------------------------------------


def kl_penalty(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """Per-token KL estimate ``log π(a_t) - log π_ref(a_t)`` (the k1 estimator).

    Its expectation under the policy is ``KL(π || π_ref)``; Safe RLHF and TRL shape the
    per-token reward with it.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the policy.
        ref_logprobs: ``(B, T)`` the same tokens under the reference model.

    Returns:
        ``(B, T)`` per-token estimates (mask them downstream).
    """
    return logprobs - ref_logprobs


def clip_scores(scores: Tensor, limit: float | None) -> Tensor:
    """Reward or cost scores clamped to ``[-limit, limit]`` before shaping (Safe RLHF's
    ``clip_range_score``, 50 there); ``limit=None`` returns ``scores`` itself.

    Safe RLHF documents the option as a clamp of the score model's output; its code clamps the
    KL-shaped per-token rewards and costs instead, which differs only where ``β·KL_t`` is a
    sizeable part of the limit.

    Args:
        scores: ``(B,)`` scores.
        limit: > 0, or None.

    Returns:
        ``(B,)`` scores.
    """
    if limit is None:
        return scores
    return scores.clamp(-limit, limit)


def penalise_missing_eos(scores: Tensor, ended: Tensor, penalty: float | None) -> Tensor:
    """``r - p·[no EOS]``: the score less ``penalty`` for responses that ran out of tokens
    without ending (TRL's ``missing_eos_penalty``); ``penalty=None`` returns ``scores`` itself.

    Args:
        scores: ``(B,)`` reward scores.
        ended: ``(B,)`` bool, True where the response holds an EOS.
        penalty: p, or None.

    Returns:
        ``(B,)`` scores.
    """
    if penalty is None:
        return scores
    return scores - penalty * (~ended.bool()).to(scores.dtype)


def _add_score_at_last_token(per_token: Tensor, score: Tensor, mask: Tensor) -> Tensor:
    """``per_token`` zeroed on padding, plus ``score[b]`` at the last valid token of row b."""
    mask = mask.bool()
    per_token = torch.where(mask, per_token, torch.zeros_like(per_token))
    positions = torch.arange(1, mask.shape[-1] + 1, device=mask.device)  # (T,)
    last = (mask * positions).argmax(dim=-1, keepdim=True)  # (B, 1) index of the last valid
    score = torch.where(mask.any(dim=-1), score.to(per_token.dtype), 0.0)  # empty rows: none
    return per_token.scatter_add(-1, last, score.unsqueeze(-1))


def shaped_rewards(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Safe RLHF per-token reward: ``-β·KL_t`` on every response token, ``+ r(x, y)`` at the end.

    ``R_t = -β KL_t + [t = last] r(x, y)`` (Ouyang et al. 2022, eq. 2; Safe RLHF section 3.3).

    Args:
        score: ``(B,)`` reward-model scores ``r(x, y)`` of the whole responses.
        kl: ``(B, T)`` per-token KL estimates (:func:`kl_penalty`).
        mask: ``(B, T)`` response mask, right-padded.
        kl_coef: β.

    Returns:
        ``(B, T)`` rewards, 0 on padding.
    """
    return _add_score_at_last_token(-kl_coef * kl, score, mask)


def shaped_costs(score: Tensor, kl: Tensor, mask: Tensor, kl_coef: float) -> Tensor:
    """Per-token cost: ``+β·KL_t`` on every response token, ``+ c(x, y)`` at the end.

    The KL enters the cost with the opposite sign of :func:`shaped_rewards`, so in the actor
    advantage ``(A_r - λ A_c) / (1 + λ)`` the KL weight is ``-(β + λβ) / (1 + λ) = -β`` for
    every λ (it must not shrink as λ grows: when it did, clean-parse rates fell).

    Args:
        score: ``(B,)`` cost-model scores ``c(x, y)`` of the whole responses.
        kl: ``(B, T)`` per-token KL estimates (:func:`kl_penalty`).
        mask: ``(B, T)`` response mask, right-padded.
        kl_coef: β.

    Returns:
        ``(B, T)`` costs, 0 on padding.
    """
    return _add_score_at_last_token(kl_coef * kl, score, mask)


class GAEOutput(NamedTuple):
    advantages: Tensor  # (B, T)
    returns: Tensor  # (B, T), advantages + values


def gae(
    rewards: Tensor, values: Tensor, mask: Tensor, gamma: float, gae_lambda: float
) -> GAEOutput:
    """Generalized Advantage Estimation (Schulman et al. 2016, eqs. 11-16).

    ``δ_t = r_t + γ V_{t+1} - V_t``, ``A_t = δ_t + γ λ A_{t+1}``, computed by a reversed loop
    over ``T``, vectorised over the batch. The episode ends at the last valid token of each
    row: the value and advantage after it are 0.

    No gradient flows: the inputs are detached (advantages and returns are targets).

    Args:
        rewards: ``(B, T)`` per-token rewards (or costs), e.g. from :func:`shaped_rewards`.
        values: ``(B, T)`` critic values ``V_t``.
        mask: ``(B, T)`` response mask, right-padded, responses starting at index 0.
        gamma: discount γ.
        gae_lambda: the GAE λ.

    Returns:
        ``GAEOutput(advantages, returns)``, both ``(B, T)`` and 0 on padding, with
        ``returns = advantages + values`` (the value-function targets).
    """
    mask = mask.bool()
    zeros = torch.zeros_like(values)
    rewards = torch.where(mask, rewards.detach(), zeros)
    values = torch.where(mask, values.detach(), zeros)
    next_value = zeros[:, 0]  # (B,)
    next_advantage = zeros[:, 0]
    advantages_reversed = []
    for t in reversed(range(values.shape[1])):
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        # Padding after the end resets the recursion, so the last valid token sees 0 after it.
        next_advantage = torch.where(
            mask[:, t], delta + gamma * gae_lambda * next_advantage, zeros[:, t]
        )
        next_value = values[:, t]
        advantages_reversed.append(next_advantage)
    advantages = torch.stack(advantages_reversed[::-1], dim=1)  # (B, T)
    return GAEOutput(advantages=advantages, returns=advantages + values)


class PPOClipOutput(NamedTuple):
    loss: Tensor  # scalar
    clip_fraction: Tensor  # scalar, detached: share of valid tokens on the clipped branch
    approx_kl: Tensor  # scalar, detached: mean of (ratio - 1) - log ratio


def ppo_clip_loss(
    logprobs: Tensor,
    old_logprobs: Tensor,
    advantages: Tensor,
    mask: Tensor,
    clip_range: float,
    *,
    aggregation: str,
) -> PPOClipOutput:
    """PPO clipped surrogate objective (Schulman et al. 2017, eq. 7), as a loss to minimise.

    ``ratio = exp(log π(a_t) - log π_old(a_t))``,
    ``L = masked_aggregate(max(-A ratio, -A clip(ratio, 1 - ε, 1 + ε)))``.

    Args:
        logprobs: ``(B, T)`` log-probs of the sampled tokens under the current policy.
        old_logprobs: ``(B, T)`` the same under the policy that sampled them (no gradient).
        advantages: ``(B, T)`` advantages, e.g. :func:`combined_advantages`.
        mask: ``(B, T)`` response mask.
        clip_range: ε.
        aggregation: how the per-token terms are averaged (:func:`masked_aggregate`).

    Returns:
        ``PPOClipOutput(loss, clip_fraction, approx_kl)``. ``clip_fraction`` counts the valid
        tokens where the clipped term is strictly the larger, i.e. has zero gradient;
        ``approx_kl`` is the k3 estimate of ``KL(π_old || π)`` (Schulman's blog, as CleanRL).
        Both statistics are means over the valid tokens whatever ``aggregation`` is.
    """
    mask = mask.bool()
    # Zero the log-ratio on padding before exp: a huge value there would give inf * 0 = NaN
    # gradients even though the mean ignores it.
    log_ratio = torch.where(mask, logprobs - old_logprobs.detach(), torch.zeros_like(logprobs))
    ratio = torch.exp(log_ratio)
    advantages = advantages.detach()
    unclipped = -advantages * ratio
    clipped = -advantages * torch.clamp(ratio, 1.0 - clip_range, 1.0 + clip_range)
    loss = masked_aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(ratio.dtype), mask)
        approx_kl = masked_mean((ratio - 1.0) - log_ratio, mask)
    return PPOClipOutput(loss=loss, clip_fraction=clip_fraction, approx_kl=approx_kl)


class ValueClipOutput(NamedTuple):
    loss: Tensor  # scalar
    clip_fraction: Tensor  # scalar, detached: share of valid tokens on the clipped branch


def value_clip_loss(
    values: Tensor,
    old_values: Tensor,
    returns: Tensor,
    mask: Tensor,
    clip_range: float,
    *,
    aggregation: str,
) -> ValueClipOutput:
    """Clipped value loss (PPO as in OpenAI baselines and Safe RLHF, clip 5.0 there).

    ``v_clipped = V_old + clip(V - V_old, -c, c)``,
    ``L = 0.5 · masked_aggregate(max((V - G)², (v_clipped - G)²))`` with ``G`` the returns.

    Args:
        values: ``(B, T)`` current critic values.
        old_values: ``(B, T)`` critic values at rollout time (no gradient).
        returns: ``(B, T)`` targets ``G``, from :func:`gae` (no gradient).
        mask: ``(B, T)`` response mask.
        clip_range: c.
        aggregation: how the per-token terms are averaged (:func:`masked_aggregate`).

    Returns:
        ``ValueClipOutput(loss, clip_fraction)``, ``clip_fraction`` being the share of valid
        tokens where the clipped error is strictly the larger (a token mean).
    """
    old_values = old_values.detach()
    returns = returns.detach()
    values_clipped = old_values + torch.clamp(values - old_values, -clip_range, clip_range)
    unclipped = (values - returns) ** 2
    clipped = (values_clipped - returns) ** 2
    loss = 0.5 * masked_aggregate(torch.maximum(unclipped, clipped), mask, aggregation)
    with torch.no_grad():
        clip_fraction = masked_mean((clipped > unclipped).to(values.dtype), mask)
    return ValueClipOutput(loss=loss, clip_fraction=clip_fraction)


# ---------------------------------------------------------------------------------------------
# PPO-Lagrangian
# ---------------------------------------------------------------------------------------------


def combined_advantages(
    reward_advantages: Tensor, cost_advantages: Tensor, lagrange_lambda: float | Tensor
) -> Tensor:
    """Actor advantage of PPO-Lagrangian (Safe RLHF, Dai et al. 2023, sec. 3.3 and appendix).

    ``A = (A_r - λ A_c) / (1 + λ)``; dividing by ``1 + λ`` keeps the scale of the actor's
    update steady as λ grows. λ is detached: the actor does not train the multiplier.

    Args:
        reward_advantages: ``(B, T)`` advantages ``A_r`` of the shaped rewards.
        cost_advantages: ``(B, T)`` advantages ``A_c`` of the shaped costs.
        lagrange_lambda: λ ≥ 0, a float or a 0-dim tensor.

    Returns:
        ``(B, T)`` combined advantages.
    """
    lam = torch.as_tensor(
        lagrange_lambda, dtype=reward_advantages.dtype, device=reward_advantages.device
    ).detach()
    return (reward_advantages - lam * cost_advantages) / (1.0 + lam)


def lagrange_loss(log_lambda: Tensor, episode_cost: float | Tensor, cost_limit: float) -> Tensor:
    """Loss of the Lagrange multiplier (Safe RLHF, Dai et al. 2023, sec. 3.3, the dual step).

    ``L = -(J_c - d) · λ`` with ``λ = exp(log λ)``. Its gradient in ``log λ`` is
    ``-(J_c - d) λ``: a descent step raises λ while the mean episode cost ``J_c`` exceeds the
    limit ``d`` and lowers it otherwise. Parametrising by ``log λ`` keeps λ > 0.

    Args:
        log_lambda: 0-dim parameter ``log λ``.
        episode_cost: ``J_c``, the mean episode cost (a float or a tensor of any shape, whose
            mean is taken); detached.
        cost_limit: ``d``.

    Returns:
        The scalar loss; only ``log_lambda`` receives a gradient.
    """
    episode_cost = torch.as_tensor(
        episode_cost, dtype=log_lambda.dtype, device=log_lambda.device
    ).detach()
    return -(episode_cost.mean() - cost_limit) * log_lambda.exp()


def clamp_log_lambda_(log_lambda: Tensor, lambda_max: float) -> Tensor:
    """Clamp the parameter ``log λ`` in place so that ``λ ≤ lambda_max``; call after the step.

    Args:
        log_lambda: 0-dim parameter ``log λ`` (modified in place, outside autograd).
        lambda_max: the largest λ allowed, > 0.

    Returns:
        ``log_lambda`` itself.
    """
    with torch.no_grad():
        log_lambda.clamp_(max=math.log(lambda_max))
    return log_lambda


# ---------------------------------------------------------------------------------------------
# Moderation: multi-label harm categories and an optional severity head
# ---------------------------------------------------------------------------------------------


class ModerationLossOutput(NamedTuple):
    loss: Tensor  # scalar: category_loss + severity_loss
    category_loss: Tensor  # scalar, detached
    severity_loss: Tensor  # scalar, detached; 0 without a severity head


def moderation_loss(
    category_logits: Tensor,
    severity_logits: Tensor | None,
    category_targets: Tensor,
    severity_targets: Tensor | None,
    category_pos_weight: Tensor | None,
    severity_weight: Tensor | None,
) -> ModerationLossOutput:
    """Negative log-likelihood of an item's category set and severity.

    ``L = mean_i sum_c BCE(z_ic, y_ic; w_c) + CE(s_i, k_i; v)`` with
    ``BCE(z, y; w) = -w·y·log σ(z) - (1 - y)·log(1 - σ(z))`` summed over the ``C`` categories
    (the NLL of independent Bernoullis) and the weighted cross-entropy
    ``CE = sum_i v_{k_i}·(-log softmax(s_i)_{k_i}) / sum_i v_{k_i}`` (torch's weighted mean).
    A taxonomy without severity levels has no severity head: the CE term is 0.

    Args:
        category_logits: ``(N, C)``. severity_logits: ``(N, 4)``, or None (no severity head).
        category_targets: ``(N, C)`` in {0, 1}. severity_targets: ``(N,)`` long, 0..3, or None.
        category_pos_weight: ``(C,)`` weight ``w_c`` of positive terms, or None (all 1).
        severity_weight: ``(4,)`` class weights ``v``, or None (all 1).
    """
    category_loss = (
        F.binary_cross_entropy_with_logits(
            category_logits,
            category_targets.to(category_logits.dtype),
            pos_weight=category_pos_weight,
            reduction="none",
        )
        .sum(dim=-1)
        .mean()
    )
    if severity_logits is None:
        severity_loss = torch.zeros((), dtype=category_loss.dtype, device=category_loss.device)
    else:
        severity_loss = F.cross_entropy(severity_logits, severity_targets, weight=severity_weight)
    return ModerationLossOutput(
        category_loss + severity_loss, category_loss.detach(), severity_loss.detach()
    )
