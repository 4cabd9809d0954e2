"""Gold metrics from the embedded benchmark's oracle, for any generated text."""

from __future__ import annotations

from collections.abc import Sequence

from saferlhf.data.benchmark import UNREADABLE, UNSAFE, Oracle


def _mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def gold_metrics(
    prompts: Sequence[str], responses: Sequence[str], oracle: Oracle | None = None
) -> dict[str, float]:
    """Mean gold helpfulness (all, on harmful prompts, on benign prompts, of safe responses) and
    the shares of the oracle's outcomes: ``unsafe_rate`` (harm found anywhere, unreadable text
    included; also on harmful prompts alone), ``unreadable_rate`` (no harm found, but junk),
    their sum ``unsafe_or_unreadable_rate``, and ``clean_rate`` (no junk, harmful or not)."""
    oracle = oracle or Oracle()
    scores = oracle.score_batch(prompts, responses)
    harmful = [(topic := oracle.topic(p)) is not None and topic.is_harmful for p in prompts]
    on_harmful = [s for s, h in zip(scores, harmful, strict=True) if h]
    on_benign = [s for s, h in zip(scores, harmful, strict=True) if not h]
    return {
        "helpfulness": _mean([s.helpfulness for s in scores]),
        "helpfulness_harmful": _mean([s.helpfulness for s in on_harmful]),
        "helpfulness_benign": _mean([s.helpfulness for s in on_benign]),
        "helpfulness_safe": _mean([s.helpfulness for s in scores if s.is_safe]),
        "unsafe_rate": _mean([float(not s.is_safe) for s in scores]),
        "unsafe_rate_harmful": _mean([float(not s.is_safe) for s in on_harmful]),
        "unreadable_rate": _mean([float(s.outcome == UNREADABLE) for s in scores]),
        "unsafe_or_unreadable_rate": _mean(
            [float(s.outcome in (UNSAFE, UNREADABLE)) for s in scores]
        ),
        "clean_rate": _mean([float(s.clean) for s in scores]),
    }


def answered_prompts(prompts: Sequence[str], responses_per_prompt: int) -> list[str]:
    """The prompts a policy answers once each: every prompt ``responses_per_prompt`` times, in
    rounds (all prompts, then all again), so that item ``i`` asks prompt ``i % len(prompts)``
    and two policies' ``i``-th responses answer the same prompt."""
    return list(prompts) * responses_per_prompt


def judged_prompts(prompts: Sequence[str], eval_cfg) -> list[str]:
    """What the ``eval`` node asks of a policy: its fixed prompts (:func:`fixed_eval_prompts`),
    each answered ``eval_cfg.responses_per_prompt`` times (:func:`answered_prompts`)."""
    chosen = fixed_eval_prompts(prompts, eval_cfg.num_prompts, eval_cfg.seed)
    return answered_prompts(chosen, eval_cfg.responses_per_prompt)


def fixed_eval_prompts(prompts: Sequence[str], count: int, seed: int) -> list[str]:
    """``count`` of ``prompts`` in a seeded order: the fixed set that initial and final policies
    (PPO and DPO alike) and task=evaluate's policies are judged on."""
    import torch

    order = torch.randperm(len(prompts), generator=torch.Generator().manual_seed(seed))
    return [prompts[i] for i in order[:count].tolist()]
