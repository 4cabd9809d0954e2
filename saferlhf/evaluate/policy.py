"""Policy evaluation: sample and score responses, then compare policies.

Pure functions first (no torch, no config): per-prompt outcomes, win rates with ties, the
Safe RLHF arena table (arXiv 2310.12773, section 5: each response safe or unsafe × better or
worse than the baseline's), moderation flag rates and markdown tables. Then the sampling and
scoring of one policy on a fixed prompt set (:func:`sample_and_score`) with the reward and cost
models (:class:`ScoreModel`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.data.collate import pad_sequences, tokenize_conversations
from saferlhf.errors import ConfigError
from saferlhf.models.sharding import inference_context
from saferlhf.moderation.api import unicode_problem
from saferlhf.rl.rollout import (
    Rollout,
    decode_responses,
    positions_from_mask,
    sample_responses,
    sequence_scores,
)
from saferlhf.tasks.common import ConfigPathError
from saferlhf.taxonomy import PKU_SAFERLHF, SEVERITY_LEVELS, Taxonomy, category_key

log = logging.getLogger(__name__)

WIN, TIE, LOSS = 1, 0, -1


# -- comparisons (pure) ------------------------------------------------------------------------


def pairwise_outcomes(
    a: Sequence[Any], b: Sequence[Any], higher_is_better: bool = True
) -> list[int]:
    """Per prompt, ``+1`` where policy a's score beats b's, ``-1`` where it loses, ``0`` on a tie.

    ``a``, ``b``: ``(num_prompts,)`` scores of the two policies' responses to the same prompts
    (e.g. gold helpfulness, higher is better; gold severity or cost, lower is better). A score
    may be a tuple, compared in order: ``(readable, helpfulness)`` makes an unreadable response
    lose to any readable one. Scores that compare neither way (NaN) tie.
    """
    if len(a) != len(b):
        raise ValueError(f"got {len(a)} scores for a but {len(b)} for b")

    def beats(x: Any, y: Any) -> bool:
        return x > y if higher_is_better else x < y

    return [WIN if beats(x, y) else LOSS if beats(y, x) else TIE for x, y in zip(a, b, strict=True)]


@dataclass(frozen=True)
class WinRate:
    wins: int
    losses: int
    ties: int

    @property
    def decided(self) -> int:
        return self.wins + self.losses

    @property
    def rate(self) -> float:
        """``wins / (wins + losses)``, ties excluded; 0.5 when nothing was decided, so that the
        rate of a over b and of b over a always sum to 1 (``decided`` says how much it rests on)."""
        return self.wins / self.decided if self.decided else 0.5

    def to_dict(self) -> dict[str, float]:
        return {
            "win_rate": self.rate,
            "wins": self.wins,
            "losses": self.losses,
            "ties": self.ties,
            "decided": self.decided,
        }


def win_rate(outcomes: Iterable[int]) -> WinRate:
    """Count the wins, losses and ties in per-prompt outcomes (+1, -1, 0)."""
    outcomes = list(outcomes)
    return WinRate(outcomes.count(WIN), outcomes.count(LOSS), outcomes.count(TIE))


ARENA_CELLS = tuple(f"{s}_{o}" for s in ("safe", "unsafe") for o in ("win", "lose", "tie"))


def arena_counts(safe: Sequence[bool], outcomes: Sequence[int]) -> dict[str, int]:
    """Safe RLHF's arena table as counts: policy a's response safe / unsafe × a wins / loses /
    ties on helpfulness against the baseline, one prompt per count.

    ``safe``: ``(num_prompts,)`` whether a's response is safe; ``outcomes``: a's helpfulness
    outcomes against the baseline (+1, -1, 0). Keys: ``safe_win``, ``safe_lose``, ``safe_tie``,
    ``unsafe_win``, ``unsafe_lose``, ``unsafe_tie``.
    """
    if len(safe) != len(outcomes):
        raise ValueError(f"got {len(safe)} safety labels but {len(outcomes)} outcomes")
    names = {WIN: "win", LOSS: "lose", TIE: "tie"}
    counts = dict.fromkeys(ARENA_CELLS, 0)
    for is_safe, outcome in zip(safe, outcomes, strict=True):
        counts[f"{'safe' if is_safe else 'unsafe'}_{names[outcome]}"] += 1
    return counts


def flag_rates(
    flagged: Sequence[bool],
    severities: Sequence[int | None],
    categories: Sequence[Iterable[str]],
    taxonomy: Taxonomy = PKU_SAFERLHF,
) -> dict[str, float]:
    """Moderation rates over ``N`` responses: the share flagged, the share flagged at each
    predicted severity (``flag_rate/severity_<k>``, summing to ``flag_rate``; severity 0 is
    flagged for a category alone; none for a moderator without a severity head) and the share
    with each of the moderator's ``taxonomy`` categories over its threshold
    (``flag_rate/category/<category_key(name)>``)."""
    n = len(flagged)
    if not n or len(severities) != n or len(categories) != n:
        raise ValueError("flag_rates needs one severity and one category set per response")
    sets = [set(c) for c in categories]
    rates = {"flag_rate": sum(flagged) / n}
    for level in SEVERITY_LEVELS if taxonomy.has_severity else ():
        hits = sum(f and s == level for f, s in zip(flagged, severities, strict=True))
        rates[f"flag_rate/severity_{level}"] = hits / n
    for name in taxonomy.categories:
        rates[f"flag_rate/category/{category_key(name)}"] = sum(name in c for c in sets) / n
    return rates


def mean(values: Sequence[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


def mean_and_standard_error(values: Sequence[float], num_prompts: int) -> tuple[float, float]:
    """The mean of per-response ``values`` laid out in rounds
    (:func:`saferlhf.evaluate.gold.answered_prompts`) and its standard error over prompts: the
    standard deviation of the per-prompt means over the square root of their number. The
    responses to one prompt are not independent draws of the benchmark, so the prompt is the
    unit; NaN with fewer than two prompts."""
    if num_prompts < 1 or not values or len(values) % num_prompts:
        raise ValueError(f"{len(values)} values do not fill rounds of {num_prompts} prompts")
    if num_prompts < 2:
        return mean(values), float("nan")
    per_prompt = [mean(values[i::num_prompts]) for i in range(num_prompts)]
    centre = mean(per_prompt)
    variance = sum((m - centre) ** 2 for m in per_prompt) / (num_prompts - 1)
    return centre, math.sqrt(variance / num_prompts)


def markdown_table(header: Sequence[str], rows: Iterable[Sequence[object]]) -> str:
    """A GitHub markdown table; floats with 3 decimals, None as a dash."""

    def cell(value: object) -> str:
        if value is None:
            return "–"
        return f"{value:.3f}" if isinstance(value, float) else str(value)

    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(cell(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


TABLE_COLUMNS = (
    "reward",
    "cost",
    "safe_rate",
    "gold/helpfulness",
    "gold/unsafe_rate",
    "gold/unreadable_rate",
    "gold/unsafe_or_unreadable_rate",
    "gold/clean_rate",
    "flag_rate",
    "response_length",
)


def results_markdown(results: Mapping[str, Any]) -> str:
    """``eval_table.md`` from ``eval_results.json``: the policies, the win rates against the
    baseline, the differences from it, one arena table per pair and the LLM judge's win
    rates."""
    s, answers = results["sampling"], results["responses_per_prompt"]
    parts = [
        "# Policy evaluation",
        f"{results['num_prompts']} prompts from {results['prompt_source']}; "
        f"{answers} response{'s' if answers > 1 else ''} each, "
        f"max_new_tokens={s['max_new_tokens']}, temperature={s['temperature']}, "
        f"top_k={s['top_k']}, top_p={s['top_p']}, seed {results['seed']}. "
        f"safe_rate by {results['safe_rate_source']}.",
        "## Policies",
    ]
    policies = results["policies"]
    columns = [c for c in TABLE_COLUMNS if any(c in m for m in policies.values())]
    rows = [[name, *(m.get(c) for c in columns)] for name, m in policies.items()]
    parts.append(markdown_table(["policy", *columns], rows))

    baseline, pairwise = results["baseline"], results["pairwise"]
    rows = [
        [pair, dimension, r["source"], r["win_rate"], r["wins"], r["losses"], r["ties"]]
        for pair, result in pairwise.items()
        for dimension, r in result.items()
        if dimension not in ("arena", "differences")
    ]
    if rows:
        parts.append(f"## Win rates against `{baseline}`\n\nwins / (wins + losses), ties excluded.")
        header = ["pair", "dimension", "by", "win rate", "wins", "losses", "ties"]
        parts.append(markdown_table(header, rows))

    rows = [
        [pair, metric, d["difference"], d["standard_error"], *interval(d)]
        for pair, result in pairwise.items()
        for metric, d in result.get("differences", {}).items()
    ]
    if rows:
        parts.append(
            f"## Differences from `{baseline}`\n\nMean of the policy minus mean of `{baseline}`,"
            " paired by prompt; the standard error is over prompts, the interval ±1.96 of it."
        )
        header = ["pair", "mean", "difference", "standard error", "95% low", "95% high"]
        parts.append(markdown_table(header, rows))

    for pair, result in pairwise.items():
        if "arena" not in result:
            continue
        arena, (a, b) = result["arena"], pair.split("_vs_", 1)
        parts.append(
            f"## Arena: `{a}` vs `{b}`\n\nRows: is `{a}`'s response safe (by "
            f"{arena['safety_source']}); columns: is it more helpful than `{b}`'s (by "
            f"{arena['helpfulness_source']}). Counts of responses."
        )
        outcomes = ("win", "lose", "tie")
        rows = []
        for kind in ("safe", "unsafe"):
            counts = [arena["counts"][f"{kind}_{o}"] for o in outcomes]
            rows.append([kind, *counts, sum(counts)])
        parts.append(markdown_table(["", f"{a} wins", f"{a} loses", "tie", "total"], rows))

    if judge := results.get("judge"):
        parts.append(f"## LLM judge `{judge['model']}` ({judge['prompts']} prompts)")
        rows = [
            [pair, r["helpfulness"]["win_rate"], r["harmlessness"]["win_rate"], r["malformed"]]
            for pair, r in judge["pairs"].items()
        ]
        parts.append(markdown_table(["pair", "helpfulness", "harmlessness", "malformed"], rows))
    return "\n\n".join(parts) + "\n"


def interval(difference: Mapping[str, float | None]) -> tuple[float | None, float | None]:
    """The normal 95% interval of a difference (None where its standard error is unknown)."""
    d, se = difference["difference"], difference["standard_error"]
    if d is None or se is None or math.isnan(se):
        return None, None
    return d - 1.96 * se, d + 1.96 * se


# -- prompts -----------------------------------------------------------------------------------


def read_prompts_file(path: str | Path) -> list[str]:
    """The prompts of a JSONL file, one ``{"prompt": "..."}`` a line (blank lines skipped);
    a bad line is an error naming the file and the line."""
    path = Path(path)
    if not path.is_file():
        raise ConfigPathError(f"task.prompts_file={str(path)!r}: no such file")
    prompts = []
    with path.open("rb") as f:  # bytes, so that a line that is not UTF-8 is named by number
        for number, raw in enumerate(f, start=1):
            problem, prompt = _prompt_of_line(raw)
            if problem:
                raise ConfigError(f"task.prompts_file {path}, line {number}: {problem}")
            if prompt is not None:
                prompts.append(prompt)
    if not prompts:
        raise ConfigError(f"task.prompts_file={str(path)!r} has no prompts")
    return prompts


def _prompt_of_line(raw: bytes) -> tuple[str | None, str | None]:
    """``(why the line is bad, None)`` or ``(None, its prompt)``; a blank line has neither."""
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as error:
        return f"not UTF-8 ({error.reason} at byte {error.start})", None
    if not line.strip():
        return None, None
    try:
        item = json.loads(line)
    except json.JSONDecodeError as error:
        return f"not valid JSON ({error.msg})", None
    prompt = item.get("prompt") if isinstance(item, dict) else None
    if not isinstance(prompt, str) or not prompt.strip():
        return 'expected an object with a non-empty "prompt" string', None
    if problem := unicode_problem(prompt):
        return f'"prompt" is {problem}', None
    return None, prompt


# -- sampling and scoring ----------------------------------------------------------------------


def same_tokenizer(a: PreTrainedTokenizerBase, b: PreTrainedTokenizerBase) -> bool:
    """Whether token ids mean the same text (and pad) under both tokenizers."""
    return a.pad_token_id == b.pad_token_id and a.get_vocab() == b.get_vocab()


@dataclass
class ScoreModel:
    """A reward or cost model (``AutoModelForSequenceClassification``, one label) with its own
    tokenizer; ``key`` is its ``init.<key>`` name."""

    key: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    max_length: int

    def score(
        self,
        rollout: Rollout,
        prompts: Sequence[str],
        responses: Sequence[str],
        shares_tokenizer: bool,
    ) -> torch.Tensor:
        """Scores ``(B,)`` of a batch. With the policy's tokenizer, of the rollout itself (as
        PPO scores it); with another tokenizer its ids would mean other text, so the decoded
        conversations are tokenized afresh (ending in EOS, like the score model's training)."""
        with inference_context(self.model):
            if shares_tokenizer:
                return sequence_scores(self.model, rollout)
            sequences = tokenize_conversations(self.tokenizer, prompts, responses, self.max_length)
            input_ids, attention_mask = pad_sequences(
                sequences, self.tokenizer.pad_token_id, "left"
            )
            device = self.model.device
            return (
                self.model(
                    input_ids=input_ids.to(device),
                    attention_mask=attention_mask.to(device),
                    position_ids=positions_from_mask(attention_mask).to(device),
                )
                .logits.squeeze(-1)
                .float()
            )


@dataclass
class PolicySamples:
    """One response per prompt, with its length in tokens and each score model's score."""

    responses: list[str] = field(default_factory=list)
    lengths: list[int] = field(default_factory=list)
    scores: dict[str, list[float]] = field(default_factory=dict)


def sample_and_score(
    policy: PreTrainedModel,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    prompt_ids: Sequence[Sequence[int]],
    sampling: Mapping[str, Any],
    seed: int | None,
    batch_size: int,
    score_models: Sequence[ScoreModel] = (),
    progress: Callable[[Iterable], Iterable] = lambda batches: batches,
) -> PolicySamples:
    """How every task judges a policy (the ``eval`` config node): one response per prompt
    sampled with fixed ``sampling`` settings (:func:`saferlhf.rl.rollout.sample_responses`'
    keyword arguments) from ``seed``, ``batch_size`` prompts per generate call, each batch
    scored by every score model. The global RNG is left as it was; with ``seed=None`` the
    draws come from the global RNG as it stands instead (the guard's resamples go on from
    where the first answers left off)."""
    shares = {m.key: same_tokenizer(tokenizer, m.tokenizer) for m in score_models}
    for key, shared in shares.items():
        if not shared:
            log.warning("init.%s has another tokenizer than the policy: re-tokenizing text", key)
    devices = [policy.device] if policy.device.type == "cuda" else []
    seeded = seed is not None
    with torch.random.fork_rng(devices=devices) if seeded else contextlib.nullcontext():
        if seeded:
            torch.manual_seed(seed)
        samples = PolicySamples(scores={m.key: [] for m in score_models})
        with inference_context(policy, *(m.model for m in score_models)):
            for start in progress(range(0, len(prompts), batch_size)):
                stop = start + batch_size
                rollout = sample_responses(policy, tokenizer, prompt_ids[start:stop], **sampling)
                responses = decode_responses(tokenizer, rollout)
                samples.responses += responses
                samples.lengths += rollout.response_mask.sum(-1).long().tolist()
                for model in score_models:
                    scores = model.score(rollout, prompts[start:stop], responses, shares[model.key])
                    samples.scores[model.key] += scores.tolist()
        return samples
