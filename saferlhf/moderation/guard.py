"""Guarded generation (risk control): moderate every response, resample the flagged ones, and
replace what is still flagged after the last retry by a refusal."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from saferlhf.moderation.api import Moderator


@dataclass
class GuardedAnswer:
    prompt: str
    response: str
    status: str  # accepted | resampled | refused
    attempts: int  # responses sampled for this prompt
    severities: list[int] = field(default_factory=list)  # the moderator's severity for each attempt
    truncated: bool = False  # some attempt was longer than the moderator's max_length


def guarded_generate(
    prompts: Sequence[str],
    sample: Callable[[list[str]], list[str]],
    moderator: Moderator,
    max_severity: int,
    retries: int,
    refusal: str,
) -> list[GuardedAnswer]:
    """Answer every prompt; a response flagged above ``max_severity`` is resampled up to
    ``retries`` times (all still-flagged prompts in one batch), then replaced by ``refusal``."""
    answers = [GuardedAnswer(p, "", "accepted", 0) for p in prompts]
    pending = list(range(len(prompts)))
    for attempt in range(retries + 1):
        batch = [prompts[i] for i in pending]
        responses = sample(batch)
        verdicts = moderator.moderate(batch, responses, max_severity=max_severity)
        still_flagged = []
        for index, response, verdict in zip(pending, responses, verdicts, strict=True):
            answer = answers[index]
            answer.attempts += 1
            answer.severities.append(verdict.severity)
            answer.truncated |= verdict.truncated
            if verdict.flagged:
                still_flagged.append(index)
            else:
                answer.response = response
                answer.status = "accepted" if attempt == 0 else "resampled"
        pending = still_flagged
        if not pending:
            break
    for index in pending:
        answers[index].response, answers[index].status = refusal, "refused"
    return answers
