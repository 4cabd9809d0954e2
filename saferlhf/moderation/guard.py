"""Guarded generation (risk control): moderate every response, resample the flagged ones, and
replace what is still flagged after the last retry by a refusal."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from saferlhf.moderation.api import Moderator, Verdict


@dataclass
class GuardedAnswer:
    prompt: str
    response: str
    status: str  # accepted | resampled | refused
    attempts: int  # responses sampled for this prompt
    severities: list[int] = field(default_factory=list)  # the moderator's severity for each attempt
    truncated: bool = False  # some attempt was longer than the moderator's max_length
    verdict: Verdict | None = None  # the moderator's verdict on the last attempt
    last_draw: Any = None  # what ``sample`` returned for the last attempt (its text, by default)

    def record(self) -> dict[str, Any]:
        """What task=generate writes per prompt (generations.jsonl)."""
        fields = ("prompt", "response", "status", "attempts", "severities", "truncated")
        return {name: getattr(self, name) for name in fields}


def guarded_generate(
    prompts: Sequence[str],
    sample: Callable[[list[str]], Sequence[Any]],
    moderator: Moderator,
    max_severity: int,
    retries: int,
    refusal: str,
    text: Callable[[Any], str] = str,
) -> list[GuardedAnswer]:
    """Answer every prompt; a response flagged above ``max_severity`` is resampled up to
    ``retries`` times (all still-flagged prompts in one batch), then replaced by ``refusal``.

    ``sample`` returns one draw per prompt: its text, or anything ``text`` reads the text from
    (the server keeps token counts and finish reasons with it); each answer keeps the draw and
    the verdict of its last attempt."""
    answers = [GuardedAnswer(p, "", "accepted", 0) for p in prompts]
    pending = list(range(len(prompts)))
    for attempt in range(retries + 1):
        batch = [prompts[i] for i in pending]
        draws = sample(batch)
        responses = [text(draw) for draw in draws]
        verdicts = moderator.moderate(batch, responses, max_severity=max_severity)
        still_flagged = []
        for index, draw, response, verdict in zip(pending, draws, responses, verdicts, strict=True):
            answer = answers[index]
            answer.attempts += 1
            answer.severities.append(verdict.severity)
            answer.truncated |= verdict.truncated
            answer.verdict, answer.last_draw = verdict, draw
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
