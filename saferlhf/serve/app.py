"""The HTTP side of ``task=serve``: routes, limits, the bearer token, counters and the audit
log. Every refusal is a 4xx in OpenAI's error shape naming the field or limit at fault."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import statistics
import time
import uuid
from collections import Counter, deque
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from starlette.exceptions import HTTPException

from saferlhf.moderation.api import unicode_problem
from saferlhf.serve.engine import Batcher, Choice, Sampling
from saferlhf.serve.protocol import APIError, ChatRequest, ModerationRequest, field_error


@dataclass(frozen=True)
class Limits:
    max_body_bytes: int
    max_tokens: int
    max_prompt_tokens: int
    max_n: int


@dataclass(frozen=True)
class Defaults:
    """Sampling of a request that leaves a setting out (``eval.sampling``)."""

    max_tokens: int
    temperature: float
    top_p: float
    top_k: int


class Metrics:
    """Counters of ``GET /metrics``: requests by route and status, choices by guard status,
    refusals, batches, and latency (count, sum, max, p50/p95 of the last 1000 requests)."""

    def __init__(self):
        self.started = time.time()
        self.requests: Counter[str] = Counter()
        self.statuses: Counter[str] = Counter()
        self.choices: Counter[str] = Counter()
        self.latencies: deque[float] = deque(maxlen=1000)
        self.latency_count = 0
        self.latency_sum = 0.0
        self.latency_max = 0.0

    def record(self, route: str, status: int, seconds: float) -> None:
        self.requests[route] += 1
        self.statuses[str(status)] += 1
        self.latencies.append(seconds)
        self.latency_count += 1
        self.latency_sum += seconds
        self.latency_max = max(self.latency_max, seconds)

    def snapshot(self, batcher: Batcher) -> dict[str, Any]:
        recent = sorted(self.latencies)

        def quantile(q: float) -> float | None:
            return recent[min(len(recent) - 1, int(q * len(recent)))] if recent else None

        return {
            "uptime_s": round(time.time() - self.started, 3),
            "requests_total": sum(self.requests.values()),
            "requests_by_route": dict(self.requests),
            "responses_by_status": dict(self.statuses),
            "choices_by_guard_status": dict(self.choices),
            "refusals_total": self.choices["refused"],
            "batches_total": batcher.batches,
            "batched_requests_total": batcher.batched_requests,
            "mean_batch_size": batcher.batched_requests / batcher.batches
            if batcher.batches
            else None,
            "latency_s": {
                "count": self.latency_count,
                "sum": round(self.latency_sum, 6),
                "max": round(self.latency_max, 6),
                "mean": round(statistics.fmean(recent), 6) if recent else None,
                "p50": quantile(0.5),
                "p95": quantile(0.95),
            },
        }


async def read_json(request: Request, limit: int) -> Any:
    """The request's JSON body, refused (413) past ``limit`` bytes without reading it all."""
    declared = request.headers.get("content-length", "")
    too_large = APIError(
        413,
        f"request body larger than serve.max_body_bytes={limit} bytes",
        code="request_too_large",
    )
    if declared.isdigit() and int(declared) > limit:
        raise too_large
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > limit:
            raise too_large
    try:
        return json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as error:
        raise APIError(
            400, f"request body is not valid JSON: {error}", code="invalid_json"
        ) from None


def parse(model, data: Any):
    if not isinstance(data, dict):
        raise APIError(400, "request body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(data)
    except ValidationError as error:
        raise field_error(error) from None


def sampling_of(body: ChatRequest, defaults: Defaults, limits: Limits) -> Sampling:
    max_tokens = body.max_completion_tokens or body.max_tokens or defaults.max_tokens
    param = "max_completion_tokens" if body.max_completion_tokens else "max_tokens"
    if max_tokens > limits.max_tokens:
        raise APIError(
            400,
            f"{param}={max_tokens}: this server allows at most serve.max_tokens={limits.max_tokens}",
            param=param,
            code="max_tokens_exceeded",
        )
    if body.n > limits.max_n:
        raise APIError(
            400, f"n={body.n}: at most serve.max_n={limits.max_n}", param="n", code="n_exceeded"
        )
    stop = [body.stop] if isinstance(body.stop, str) else (body.stop or [])
    if len(stop) > 4:
        raise APIError(400, "stop: at most 4 sequences", param="stop", code="invalid_value")
    temperature = defaults.temperature if body.temperature is None else body.temperature
    greedy = temperature == 0  # OpenAI's temperature 0: the most likely token each step
    return Sampling(
        max_tokens=max_tokens,
        temperature=1.0 if greedy else temperature,
        top_p=defaults.top_p if body.top_p is None else body.top_p,
        top_k=1 if greedy else defaults.top_k,
        stop=tuple(stop),
        seed=body.seed,
    )


def last_user_message(body: ChatRequest) -> str:
    """The prompt: the last user message (the template holds one user turn)."""
    users = [m.content for m in body.messages if m.role == "user" and m.content is not None]
    if not users:
        raise APIError(400, "messages: no user message with content", param="messages")
    prompt = users[-1]
    if problem := unicode_problem(prompt):
        raise APIError(400, f"messages: the last user message is {problem}", param="messages")
    return prompt


def completion_body(request_id: str, model: str, choices: list[Choice]) -> dict[str, Any]:
    completion_tokens = sum(c.completion_tokens for c in choices)
    prompt_tokens = choices[0].prompt_tokens
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": i,
                "message": {"role": "assistant", "content": c.text},
                "finish_reason": c.finish_reason,
                "logprobs": None,
                "saferlhf_guard": c.guard,
            }
            for i, c in enumerate(choices)
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def stream_events(request_id: str, model: str, choices: list[Choice]) -> AsyncIterator[str]:
    """Server-sent events of an answer the guard has already judged: a role chunk, the content
    and the finish reason with the verdict, per choice, then ``[DONE]``."""

    def chunk(index: int, delta: dict, finish: str | None = None, guard=None) -> str:
        choice = {"index": index, "delta": delta, "finish_reason": finish, "logprobs": None}
        if guard is not None:
            choice["saferlhf_guard"] = guard
        body = {
            "id": request_id,
            "object": "chat.completion.chunk",
            "created": int(time.time()),
            "model": model,
            "choices": [choice],
        }
        return f"data: {json.dumps(body)}\n\n"

    async def events() -> AsyncIterator[str]:
        for i, c in enumerate(choices):
            yield chunk(i, {"role": "assistant", "content": ""})
            yield chunk(i, {"content": c.text})
            yield chunk(i, {}, c.finish_reason, c.guard)
        yield "data: [DONE]\n\n"

    return events()


class AuditLog:
    """JSON Lines of every resampled or refused choice, with its verdict."""

    def __init__(self, path: Path):
        self.path = path
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, request_id: str, prompt: str, choices: list[Choice]) -> None:
        records = [
            {"time": time.time(), "id": request_id, "index": i, "prompt": prompt}
            | {"response": c.text, **c.guard}
            for i, c in enumerate(choices)
            if c.guard["status"] in ("resampled", "refused")
        ]
        if records:
            with self.path.open("a") as f:
                f.writelines(json.dumps(record) + "\n" for record in records)


def create_app(
    batcher: Batcher,
    model_name: str,
    defaults: Defaults,
    limits: Limits,
    audit: AuditLog,
    token: str | None,
) -> FastAPI:
    """The FastAPI app; ``token``, when set, is required as ``Authorization: Bearer`` on every
    route but ``/health``."""
    metrics = Metrics()
    engine = batcher.engine

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI):
        worker = asyncio.create_task(batcher.run())
        try:
            yield
        finally:
            worker.cancel()
            batcher.close()

    app = FastAPI(title="saferlhf", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.metrics = metrics

    @app.middleware("http")
    async def count_and_authorize(request: Request, call_next):
        started = time.perf_counter()
        if token is not None and request.url.path != "/health":
            offered = request.headers.get("authorization", "")
            if not hmac.compare_digest(offered.encode(), f"Bearer {token}".encode()):
                response = error_response(
                    APIError(
                        401,
                        "missing or wrong bearer token (Authorization: Bearer ...)",
                        kind="authentication_error",
                        code="invalid_api_key",
                    )
                )
                metrics.record(request.url.path, 401, time.perf_counter() - started)
                return response
        try:
            response = await call_next(request)
        except Exception as error:  # a bug: still one JSON error, counted, and the server goes on
            response = error_response(
                APIError(500, f"internal error: {error!r:.200}", kind="server_error")
            )
        metrics.record(request.url.path, response.status_code, time.perf_counter() - started)
        return response

    def error_response(error: APIError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        return error_response(error)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return error_response(APIError(error.status_code, str(error.detail)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_name, "guarded": engine.moderator is not None}

    @app.get("/metrics")
    async def get_metrics():
        return metrics.snapshot(batcher)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        body = parse(ChatRequest, await read_json(request, limits.max_body_bytes))
        sampling = sampling_of(body, defaults, limits)
        prompt = last_user_message(body)
        if (length := engine.prompt_tokens(prompt)) > limits.max_prompt_tokens:
            raise APIError(
                400,
                f"messages: the prompt has {length} tokens, more than "
                f"serve.max_prompt_tokens={limits.max_prompt_tokens}",
                param="messages",
                code="prompt_too_long",
            )
        choices = await batcher.complete(prompt, body.n, sampling)
        request_id = f"chatcmpl-{uuid.uuid4().hex}"
        metrics.choices.update(c.guard["status"] for c in choices)
        audit.write(request_id, prompt, choices)
        if body.stream:
            return StreamingResponse(
                stream_events(request_id, model_name, choices), media_type="text/event-stream"
            )
        return completion_body(request_id, model_name, choices)

    @app.post("/v1/moderations")
    async def moderations(request: Request):
        body = parse(ModerationRequest, await read_json(request, limits.max_body_bytes))
        if engine.moderator is None:
            raise APIError(
                404,
                "this server has no moderation model (start it with guard.moderation=DIR)",
                code="model_not_found",
            )
        texts = [body.input] if isinstance(body.input, str) else body.input
        for index, text in enumerate(texts):
            if problem := unicode_problem(text):
                raise APIError(400, f"input.{index} is {problem}", param="input")
        results = await batcher.exclusive(engine.moderate, texts)
        return {"id": f"modr-{uuid.uuid4().hex}", "model": model_name, "results": results}

    return app
