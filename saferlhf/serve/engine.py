"""The model side of ``task=serve``: one policy (and optionally one moderator) answering batches
of chat requests through the guard, and the queue that batches concurrent requests.

Rows of a batch that share their sampling settings (max_tokens, temperature, top_p, stop, seed)
are sampled in one call of the policy; a request asking for ``n`` choices adds ``n`` rows. The
guard is :func:`saferlhf.moderation.guard.guarded_generate`, unchanged: each response is
moderated, a flagged one resampled up to ``guard.retries`` times, then refused.
"""

from __future__ import annotations

import asyncio
import copy
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
from transformers import PreTrainedModel, PreTrainedTokenizerBase

from saferlhf.data.collate import encode_prompts, segment
from saferlhf.moderation.api import Moderator, flag, over_threshold
from saferlhf.moderation.guard import GuardedAnswer, guarded_generate
from saferlhf.rl.experience import ended_responses
from saferlhf.rl.rollout import decode_responses, sample_responses

T = TypeVar("T")


@dataclass(frozen=True)
class Sampling:
    """A request's sampling settings; rows with equal settings share one generation."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int  # 0 keeps every token; 1 is greedy (what temperature 0 asks for)
    stop: tuple[str, ...] = ()
    seed: int | None = None  # seeds the draw of its group of rows (best effort, as OpenAI's)


@dataclass(frozen=True)
class GuardSettings:
    max_severity: int
    retries: int
    refusal: str


@dataclass
class Choice:
    text: str
    finish_reason: str  # stop | length | content_filter (refused by the guard)
    completion_tokens: int
    guard: dict[str, Any]  # the guard's verdict on this choice (status, attempts, ...)
    prompt_tokens: int = 0


@dataclass
class _Draw:
    """One sampled response before the guard judges it."""

    text: str
    finish_reason: str
    completion_tokens: int
    prompt_tokens: int


def cut_at_stop(text: str, stop: Sequence[str]) -> tuple[str, bool]:
    """``text`` up to the first occurrence of any stop sequence, and whether one occurred."""
    cuts = [index for index in (text.find(s) for s in stop if s) if index >= 0]
    return (text[: min(cuts)], True) if cuts else (text, False)


class Engine:
    """The loaded policy, tokenizer and moderator. Not thread-safe: :class:`Batcher` calls it
    from one worker thread only."""

    def __init__(
        self,
        policy: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        max_length: int,
        moderator: Moderator | None,
        guard: GuardSettings,
    ):
        self.policy = policy.eval()
        self.tokenizer = tokenizer
        # Requests are measured on the event loop while the worker thread tokenizes: a fast
        # tokenizer used from two threads at once can fail ("Already borrowed").
        self.counting_tokenizer = copy.deepcopy(tokenizer)
        self.max_length = max_length
        self.moderator = moderator
        self.guard = guard
        self.rng_devices = [policy.device] if policy.device.type == "cuda" else []

    def prompt_tokens(self, prompt: str) -> int:
        """Tokens of ``prompt`` alone, without the template (what serve.max_prompt_tokens limits)."""
        return len(segment(self.counting_tokenizer, [prompt], None)[0].prompt)

    def complete(self, requests: Sequence[tuple[str, int, Sampling]]) -> list[list[Choice]]:
        """The choices of each ``(prompt, n, sampling)`` request, sampled group by group."""
        groups: dict[Sampling, list[tuple[int, str]]] = {}  # rows: (request, prompt)
        for request, (prompt, n, sampling) in enumerate(requests):
            groups.setdefault(sampling, []).extend([(request, prompt)] * n)
        choices: list[list[Choice]] = [[] for _ in requests]
        for sampling, members in groups.items():
            prompts = [prompt for _, prompt in members]
            if sampling.seed is None:
                answers = self._answer(prompts, sampling)
            else:  # seeded apart: unseeded requests do not become predictable after it
                with torch.random.fork_rng(devices=self.rng_devices):
                    torch.manual_seed(sampling.seed)
                    answers = self._answer(prompts, sampling)
            for (request, _), choice in zip(members, answers, strict=True):
                choices[request].append(choice)
        return choices

    def _sample(self, prompts: list[str], sampling: Sampling) -> list[_Draw]:
        room = self.max_length - sampling.max_tokens
        prompt_ids = encode_prompts(self.tokenizer, prompts, room).examples
        rollout = sample_responses(
            self.policy,
            self.tokenizer,
            prompt_ids,
            sampling.max_tokens,
            sampling.temperature,
            sampling.top_k,
            sampling.top_p,
        )
        lengths = rollout.response_mask.sum(-1).long().tolist()
        ended_rows = ended_responses(rollout.responses, self.tokenizer.eos_token_id).tolist()
        draws = []
        for ids, text, length, ended in zip(
            prompt_ids,
            decode_responses(self.tokenizer, rollout),
            lengths,
            ended_rows,
            strict=True,
        ):
            text, stopped = cut_at_stop(text, sampling.stop)
            reason = "stop" if stopped or ended else "length"
            draws.append(_Draw(text, reason, length - int(ended), len(ids)))
        return draws

    def _answer(self, prompts: list[str], sampling: Sampling) -> list[Choice]:
        if self.moderator is None:
            return [
                Choice(
                    d.text,
                    d.finish_reason,
                    d.completion_tokens,
                    {"status": "unguarded", "attempts": 1},
                    d.prompt_tokens,
                )
                for d in self._sample(prompts, sampling)
            ]
        g = self.guard
        answers = guarded_generate(
            prompts, lambda batch: self._sample(batch, sampling), self.moderator,
            g.max_severity, g.retries, g.refusal, text=lambda draw: draw.text,
        )  # fmt: skip
        return [_choice(answer) for answer in answers]

    def moderate(self, texts: Sequence[str]) -> list[dict[str, Any]]:
        """OpenAI moderation results for ``texts``, each judged as a response to an empty
        prompt, flagged by the guard's rule (``guard.max_severity``)."""
        assert self.moderator is not None
        moderator = self.moderator
        probs, severity, truncated = moderator.predict([""] * len(texts), list(texts))
        flagged = flag(probs, moderator.thresholds, severity, self.guard.max_severity)
        over = over_threshold(probs, moderator.thresholds)
        names = moderator.taxonomy.categories
        return [
            {
                "flagged": bool(flagged[row]),
                "categories": {name: bool(over[row, c]) for c, name in enumerate(names)},
                "category_scores": {
                    name: round(float(probs[row, c]), 6) for c, name in enumerate(names)
                },
                "severity": None if severity is None else int(severity[row]),
                "truncated": truncated[row],
            }
            for row in range(len(texts))
        ]


def _choice(answer: GuardedAnswer) -> Choice:
    """A guarded answer as a choice, with the verdict on its last attempt; the token counts
    are those of its last draw."""
    draw, verdict = answer.last_draw, answer.verdict
    refused = answer.status == "refused"
    guard = {
        "status": answer.status,
        "attempts": answer.attempts,
        "flagged": verdict.flagged,
        "severity": verdict.severity,
        "categories": verdict.categories,
        "severities": answer.severities,
        "truncated": answer.truncated,
    }
    return Choice(
        answer.response,
        "content_filter" if refused else draw.finish_reason,
        draw.completion_tokens,
        guard,
        draw.prompt_tokens,
    )


@dataclass
class _Job:
    prompt: str
    n: int
    sampling: Sampling
    future: asyncio.Future


class Batcher:
    """Collects concurrent requests into batches for one :class:`Engine`: the first request of
    a batch waits up to ``batch_wait_s`` for up to ``max_batch_size - 1`` others, then the
    batch runs in the single worker thread (one model, one generation at a time) while the
    next batch gathers."""

    def __init__(self, engine: Engine, max_batch_size: int, batch_wait_s: float):
        self.engine = engine
        self.max_batch_size = max_batch_size
        self.batch_wait_s = batch_wait_s
        self.queue: asyncio.Queue[_Job] = asyncio.Queue()
        self.worker = ThreadPoolExecutor(max_workers=1, thread_name_prefix="saferlhf-model")
        self.batches = 0
        self.batched_requests = 0

    async def complete(self, prompt: str, n: int, sampling: Sampling) -> list[Choice]:
        future = asyncio.get_running_loop().create_future()
        await self.queue.put(_Job(prompt, n, sampling, future))
        return await future

    async def exclusive(self, function: Callable[..., T], *args: Any) -> T:
        """Run ``function`` in the model's worker thread, between batches."""
        return await asyncio.get_running_loop().run_in_executor(self.worker, function, *args)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            batch = [await self.queue.get()]
            deadline = loop.time() + self.batch_wait_s
            while len(batch) < self.max_batch_size:
                try:
                    batch.append(self.queue.get_nowait())
                    continue
                except asyncio.QueueEmpty:
                    pass
                remaining = deadline - loop.time()
                if remaining <= 0:
                    break
                try:
                    batch.append(await asyncio.wait_for(self.queue.get(), remaining))
                except asyncio.TimeoutError:
                    break
            batch = [job for job in batch if not job.future.cancelled()]  # clients gone
            if batch:
                await self._run_batch(batch)

    async def _run_batch(self, batch: list[_Job]) -> None:
        self.batches += 1
        self.batched_requests += len(batch)
        requests = [(job.prompt, job.n, job.sampling) for job in batch]
        try:
            results = await self.exclusive(self.engine.complete, requests)
        except Exception as error:  # each waiting request reports it; the server goes on
            for job in batch:
                if not job.future.done():
                    job.future.set_exception(error)
            return
        for job, choices in zip(batch, results, strict=True):
            if not job.future.done():
                job.future.set_result(choices)

    def close(self) -> None:
        self.worker.shutdown(wait=True, cancel_futures=True)
