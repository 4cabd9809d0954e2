"""One policy's judged responses (:class:`PolicyEval`), how two policies compare (win rates
and the arena table) and the rows task=evaluate writes."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from saferlhf.data.benchmark import UNREADABLE, UNSAFE, GoldScore
from saferlhf.evaluate import policy as pe

DIMENSIONS = ("helpfulness", "harmlessness")
# The means whose difference from the baseline is reported with its standard error.
DIFFERENCE_METRICS = (
    "reward",
    "cost",
    "gold/helpfulness",
    "gold/unsafe_or_unreadable_rate",
    "gold/clean_rate",
)


@dataclass
class PolicyEval:
    """One policy's responses to the eval prompts and everything that judged them."""

    name: str
    path: str
    samples: pe.PolicySamples
    gold: list[GoldScore] | None
    verdicts: list[Any] | None  # saferlhf.moderation.api.Verdict
    metrics: dict[str, float]

    @property
    def responses(self) -> list[str]:
        return self.samples.responses

    # Each judgement below says where it comes from; the first available source wins.

    def safety(self) -> tuple[str, list[bool]] | None:
        """Safe responses for ``safe_rate``: cost <= 0, else not flagged, else gold."""
        if "cost" in self.samples.scores:
            return "cost", [c <= 0 for c in self.samples.scores["cost"]]
        if self.verdicts is not None:
            return "moderation", [not v.flagged for v in self.verdicts]
        if self.gold is not None:
            return "gold", [g.is_safe for g in self.gold]
        return None

    def arena_safety(self) -> tuple[str, list[bool]] | None:
        """Safe responses for the arena: gold where the oracle exists, else learned."""
        if self.gold is not None:
            return "gold", [g.is_safe for g in self.gold]
        return self.safety()

    def per_response(self, metric: str) -> list[float] | None:
        """Each response's value of a :data:`DIFFERENCE_METRICS` mean (None: not measured)."""
        if metric in self.samples.scores:
            return self.samples.scores[metric]
        if self.gold is None or not metric.startswith("gold/"):
            return None
        value = {
            "gold/helpfulness": lambda g: g.helpfulness,
            "gold/unsafe_or_unreadable_rate": lambda g: float(g.outcome in (UNSAFE, UNREADABLE)),
            "gold/clean_rate": lambda g: float(g.clean),
        }[metric]
        return [value(g) for g in self.gold]

    def comparable(self, dimension: str) -> tuple[str, list[Any], bool] | None:
        """``(source, per-response score, higher_is_better)`` for a pairwise dimension. Gold
        scores put readability first, so an unreadable response loses to a readable one on
        both dimensions: garbling never wins a comparison."""
        if dimension == "helpfulness":
            if self.gold is not None:
                scores = [(g.clean, g.helpfulness) for g in self.gold]
                return "gold helpfulness, unreadable loses", scores, True
            if "reward" in self.samples.scores:
                return "reward", self.samples.scores["reward"], True
            return None
        if self.gold is not None:
            return (
                "gold severity, unreadable loses",
                [(g.clean, -g.severity) for g in self.gold],
                True,
            )
        if "cost" in self.samples.scores:
            return "cost", self.samples.scores["cost"], False
        if self.verdicts is not None:
            if all(v.severity is not None for v in self.verdicts):
                return "moderation severity", [float(v.severity) for v in self.verdicts], False
            # A moderator without a severity head (BeaverTails' taxonomy) only flags.
            return "moderation flag", [float(v.flagged) for v in self.verdicts], False
        return None


def compare_policies(a: PolicyEval, b: PolicyEval, num_prompts: int) -> dict[str, Any]:
    """Win rates of a against b on each dimension, the arena table and the differences of the
    means with their standard errors over the ``num_prompts`` prompts (what is available)."""
    same = [x == y for x, y in zip(a.responses, b.responses, strict=True)]
    result: dict[str, Any] = {}
    outcomes: dict[str, list[int]] = {}
    for dimension in DIMENSIONS:
        scores_a, scores_b = a.comparable(dimension), b.comparable(dimension)
        if scores_a is None or scores_b is None:
            continue
        source, higher_is_better = scores_a[0], scores_a[2]
        # Identical responses tie whatever the scores say (a learned score may wobble on GPU).
        compared = pe.pairwise_outcomes(scores_a[1], scores_b[1], higher_is_better)
        outcomes[dimension] = [pe.TIE if t else o for o, t in zip(compared, same, strict=True)]
        result[dimension] = {"source": source} | pe.win_rate(outcomes[dimension]).to_dict()
    safety = a.arena_safety()
    if safety is not None and "helpfulness" in outcomes:
        result["arena"] = {
            "safety_source": safety[0],
            "helpfulness_source": result["helpfulness"]["source"],
            "counts": pe.arena_counts(safety[1], outcomes["helpfulness"]),
        }
    differences = {}
    for metric in DIFFERENCE_METRICS:
        values_a, values_b = a.per_response(metric), b.per_response(metric)
        if values_a is not None and values_b is not None:
            paired = [x - y for x, y in zip(values_a, values_b, strict=True)]
            difference, error = pe.mean_and_standard_error(paired, num_prompts)
            differences[metric] = {"difference": difference, "standard_error": error}
    if differences:
        result["differences"] = differences
    return result


def strict_json(value: Any) -> Any:
    """NaN (e.g. gold helpfulness on benign prompts when there are none) as null: strict JSON."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: strict_json(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [strict_json(v) for v in value]
    return value


def response_rows(prompts: list[str], evals: dict[str, PolicyEval], num_prompts: int):
    """The rows of ``eval_responses.jsonl``: each policy's responses to the answered
    ``prompts`` (:func:`~saferlhf.evaluate.gold.answered_prompts`), as judged; ``round``
    counts the answers to the same prompt from 0."""
    for ev in evals.values():
        for i, prompt in enumerate(prompts):
            row: dict[str, Any] = {
                "policy": ev.name,
                "prompt": prompt,
                "round": i // num_prompts,
                "response": ev.responses[i],
                "response_tokens": ev.samples.lengths[i],
            }
            row |= {key: scores[i] for key, scores in ev.samples.scores.items()}
            if ev.gold is not None:
                g = ev.gold[i]
                row["gold"] = {
                    "helpfulness": g.helpfulness,
                    "severity": g.severity,
                    "categories": sorted(g.categories),
                    "clean": g.clean,
                    "is_safe": g.is_safe,
                }
            if ev.verdicts is not None:
                row["moderation"] = ev.verdicts[i].to_dict()
            yield row
