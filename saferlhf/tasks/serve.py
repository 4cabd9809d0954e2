"""``saferlhf task=serve policy_path=DIR [guard.moderation=DIR] [serve.port=8000]``: serve a
policy behind an OpenAI-compatible API (``saferlhf.serve``) until Ctrl-C or SIGTERM.

Routes: ``POST /v1/chat/completions`` (the last user message is the prompt, in the project's
template; each choice carries the guard's verdict in ``saferlhf_guard``), ``POST
/v1/moderations`` (with ``guard.moderation``), ``GET /health`` and ``GET /metrics``. A request
that leaves a sampling setting out gets ``eval.sampling``'s. Resampled and refused choices are
written to ``audit.jsonl`` in the run dir; the summary holds the final counters.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from saferlhf.errors import ConfigError
from saferlhf.run import RunContext, TaskResult
from saferlhf.tasks.common import ConfigPathError

log = logging.getLogger(__name__)


def _check(cfg) -> None:
    if not cfg.policy_path or not Path(cfg.policy_path).is_dir():
        raise ConfigPathError(f"policy_path={cfg.policy_path!r}: expected a policy folder")
    if cfg.guard.moderation and not Path(cfg.guard.moderation).is_dir():
        raise ConfigPathError(
            f"guard.moderation={cfg.guard.moderation!r}: expected a moderation folder"
        )
    serve, max_length = cfg.serve, cfg.model.max_length
    if max_length <= serve.max_tokens:
        raise ConfigError(
            f"model.max_length={max_length}: expected a value > serve.max_tokens="
            f"{serve.max_tokens}, so that a prompt has room before the generated tokens"
        )
    default = cfg.eval.sampling.max_new_tokens
    if default > serve.max_tokens:
        raise ConfigError(
            f"eval.sampling.max_new_tokens={default}: the default max_tokens must be at most "
            f"serve.max_tokens={serve.max_tokens}"
        )


def _check_room(tokenizer, max_length: int, max_tokens: int) -> None:
    """A request of serve.max_tokens must leave room for the template and a prompt token."""
    from saferlhf.data.collate import segment

    template = segment(tokenizer, ["x"], None)[0].fixed
    if max_length - max_tokens <= template:
        raise ConfigError(
            f"serve.max_tokens={max_tokens}: leaves {max_length - max_tokens} of "
            f"model.max_length={max_length} tokens for the prompt, which needs the template's "
            f"{template} and at least one more"
        )


def _token(token_env: str | None) -> str | None:
    if not token_env:
        return None
    token = os.environ.get(token_env) or None
    if token is None:
        log.warning("serve.token_env=%s: the variable is not set; no token is required", token_env)
    return token


def serve_task(run: RunContext) -> TaskResult:
    cfg = run.cfg
    _check(cfg)
    token = _token(cfg.serve.token_env)
    from transformers import AutoModelForCausalLM

    from saferlhf.models import load_tokenizer
    from saferlhf.serve.app import AuditLog, Defaults, Limits, create_app
    from saferlhf.serve.engine import Batcher, Engine, GuardSettings
    from saferlhf.serve.server import listen, run_server

    serve, sampling = cfg.serve, cfg.eval.sampling
    tokenizer = load_tokenizer(cfg.policy_path)
    _check_room(tokenizer, cfg.model.max_length, serve.max_tokens)
    sock = listen(serve.host, serve.port)  # before loading the models: a taken port fails at once
    try:
        moderator = None
        if cfg.guard.moderation:
            from saferlhf.moderation import Moderator

            moderator = Moderator.from_pretrained(cfg.guard.moderation)
        engine = Engine(
            AutoModelForCausalLM.from_pretrained(cfg.policy_path),
            tokenizer,
            cfg.model.max_length,
            moderator,
            GuardSettings(cfg.guard.max_severity, cfg.guard.retries, cfg.guard.refusal),
        )
        batcher = Batcher(engine, serve.max_batch_size, serve.batch_wait_ms / 1000)
        audit = AuditLog(run.run_dir / "audit.jsonl")
        app = create_app(
            batcher,
            Path(cfg.policy_path).name,
            Defaults(sampling.max_new_tokens, sampling.temperature, sampling.top_p, sampling.top_k),
            Limits(serve.max_body_bytes, serve.max_tokens, serve.max_prompt_tokens, serve.max_n),
            audit,
            token,
        )
        run_server(app, sock)
    finally:
        sock.close()
    counters = app.state.metrics.snapshot(batcher)
    metrics = {
        "serve/requests": counters["requests_total"],
        "serve/refusals": counters["refusals_total"],
        "serve/batches": counters["batches_total"],
    }
    run.log_metrics(metrics)
    return TaskResult(metrics, {"audit_log": str(audit.path)})
