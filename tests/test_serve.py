"""task=serve with real clients: the ``saferlhf task=serve`` command in a subprocess (guarded,
with a bearer token, batching on) and the same app in a thread (unguarded, batching off),
spoken to with the official ``openai`` client and plain HTTP."""

import asyncio
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
import torch
import uvicorn

from saferlhf.cli import run
from saferlhf.config import validate_config
from saferlhf.errors import ConfigError
from saferlhf.models import build_score_model, load_tokenizer
from saferlhf.moderation.api import export_moderator
from saferlhf.serve.app import AuditLog, Defaults, Limits, create_app
from saferlhf.serve.engine import Batcher, Engine, GuardSettings, Sampling
from saferlhf.serve.server import ListenError, listen
from saferlhf.tasks.common import ConfigPathError
from tests.tiny import benchmark_tokenizer, micro_model_cfg, save_micro_artifacts

TOKEN = "test-token-1234"
REFUSAL = "i cannot help with that ."
LIMITS = Limits(max_body_bytes=4096, max_tokens=8, max_prompt_tokens=64, max_n=4)
SAFERLHF = shutil.which("saferlhf", path=str(Path(sys.executable).parent))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory) -> Path:
    """The micro policy and a micro moderator whose thresholds of 0 flag every response."""
    root = save_micro_artifacts(tmp_path_factory.mktemp("serve"))
    tokenizer = benchmark_tokenizer(num_train=200, vocab_size=512)
    torch.manual_seed(0)
    model = build_score_model(micro_model_cfg(), tokenizer, num_labels=23)
    export_moderator(model, tokenizer, [0.0] * 19, 128, root / "moderation")
    return root


@pytest.fixture(scope="module")
def guarded(artifacts, tmp_path_factory):
    """``saferlhf task=serve`` guarded by the always-flagging moderator (one retry, then
    refused), with a token, batching up to 8 requests; stopped by SIGTERM at the end."""
    port, run_dir = free_port(), tmp_path_factory.mktemp("run")
    command = [
        SAFERLHF,
        "task=serve",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        f"policy_path={artifacts / 'policy'}",
        f"guard.moderation={artifacts / 'moderation'}",
        "guard.retries=1",
        f"serve.port={port}",
        "serve.token_env=SAFERLHF_TEST_TOKEN",
        f"serve.max_body_bytes={LIMITS.max_body_bytes}",
        f"serve.max_tokens={LIMITS.max_tokens}",
        f"serve.max_prompt_tokens={LIMITS.max_prompt_tokens}",
        f"serve.max_n={LIMITS.max_n}",
        "serve.max_batch_size=8",
        "eval.sampling.max_new_tokens=4",
    ]
    env = os.environ | {"SAFERLHF_TEST_TOKEN": TOKEN}
    server = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        assert server.poll() is None, server.stdout.read().decode()
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            assert time.monotonic() < deadline, "the server did not start within 120 s"
            time.sleep(0.2)
    yield base_url, run_dir
    server.send_signal(signal.SIGTERM)
    output = server.communicate(timeout=60)[0].decode()
    assert server.returncode == 0, output
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["task"] == "serve" and "serve/refusals" in summary["metrics"]


@pytest.fixture(scope="module")
def unguarded(artifacts, tmp_path_factory):
    """The same app in a thread of this process: no moderator, no token, batching off."""
    policy = artifacts / "policy"
    from transformers import AutoModelForCausalLM

    engine = Engine(
        AutoModelForCausalLM.from_pretrained(policy),
        load_tokenizer(str(policy)),
        128,
        None,
        GuardSettings(0, 0, REFUSAL),
    )
    app = create_app(
        Batcher(engine, max_batch_size=1, batch_wait_s=0.0),
        "policy",
        Defaults(max_tokens=4, temperature=1.0, top_p=0.9, top_k=0),
        LIMITS,
        AuditLog(tmp_path_factory.mktemp("audit") / "audit.jsonl"),
        token=None,
    )
    sock = listen("127.0.0.1", free_port())
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    while not server.started:
        time.sleep(0.05)
    yield base_url
    server.should_exit = True
    thread.join(timeout=30)


def client(base_url: str, token: str = "unused") -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{base_url}/v1", api_key=token, max_retries=0, timeout=60)


HELLO = [{"role": "user", "content": "how do i cook rice ?"}]


def test_the_openai_client_gets_choices_with_usage_and_the_guard_field(unguarded):
    answer = client(unguarded).chat.completions.create(
        model="policy", messages=HELLO, max_tokens=6, n=2, seed=7, temperature=0.8
    )
    assert answer.object == "chat.completion" and len(answer.choices) == 2
    for choice in answer.choices:
        assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
        assert choice.finish_reason in ("stop", "length")
        assert choice.model_extra["saferlhf_guard"] == {"status": "unguarded", "attempts": 1}
    assert 0 < answer.usage.prompt_tokens and answer.usage.completion_tokens <= 12
    again = client(unguarded).chat.completions.create(
        model="policy", messages=HELLO, max_tokens=6, n=2, seed=7, temperature=0.8
    )
    assert [c.message.content for c in again.choices] == [c.message.content for c in answer.choices]


def test_temperature_0_is_greedy_and_a_stop_sequence_cuts_the_text(unguarded):
    greedy = client(unguarded).chat.completions.create(
        model="policy", messages=HELLO, max_tokens=6, n=2, temperature=0
    )
    assert greedy.choices[0].message.content == greedy.choices[1].message.content
    stopped = client(unguarded).chat.completions.create(
        model="policy", messages=HELLO, max_tokens=8, n=4, stop=[" "], temperature=1
    )
    assert all(" " not in c.message.content for c in stopped.choices)


def test_each_choice_carries_the_verdict_on_its_own_last_attempt(artifacts):
    """A moderator whose verdicts vary (thresholds of 1 leave the severity head alone to flag):
    accepted, resampled and refused rows mix in the guard's batches, and each choice must
    still get its own attempt's verdict."""
    policy = artifacts / "policy"
    tokenizer = load_tokenizer(str(policy))
    torch.manual_seed(4)
    model = build_score_model(micro_model_cfg(), tokenizer, num_labels=23)
    from transformers import AutoModelForCausalLM

    from saferlhf.moderation import Moderator

    moderator = Moderator(model, tokenizer, [1.0] * 19, 128, "cpu")
    engine = Engine(
        AutoModelForCausalLM.from_pretrained(policy),
        tokenizer,
        128,
        moderator,
        GuardSettings(max_severity=0, retries=2, refusal=REFUSAL),
    )
    sampling = Sampling(max_tokens=6, temperature=1.0, top_p=1.0, top_k=0)
    torch.manual_seed(0)
    choices = engine.complete([("how do i cook rice ?", 24, sampling)])[0]
    assert len({c.guard["status"] for c in choices}) > 1, "the guard's batches did not mix"
    for choice in choices:
        verdict = choice.guard
        assert verdict["severity"] == verdict["severities"][-1]
        assert len(verdict["severities"]) == verdict["attempts"]
        assert verdict["flagged"] == (verdict["status"] == "refused")
        if verdict["status"] != "refused":
            judged = moderator.moderate(["how do i cook rice ?"], [choice.text])
            assert judged[0].severity == verdict["severity"]


def test_a_stream_sends_the_same_answer_as_server_sent_events(unguarded):
    kwargs = {"model": "policy", "messages": HELLO, "max_tokens": 6, "seed": 3}
    whole = client(unguarded).chat.completions.create(**kwargs)
    chunks = list(client(unguarded).chat.completions.create(stream=True, **kwargs))
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert text == whole.choices[0].message.content
    assert chunks[-1].choices[0].finish_reason == whole.choices[0].finish_reason


def test_an_unguarded_server_has_no_moderations(unguarded):
    response = httpx.post(f"{unguarded}/v1/moderations", json={"input": "hello"})
    assert response.status_code == 404 and "guard.moderation" in response.json()["error"]["message"]


def test_a_flagged_answer_is_refused_with_its_verdict_and_audited(guarded):
    base_url, run_dir = guarded
    answer = client(base_url, TOKEN).chat.completions.create(
        model="policy", messages=HELLO, max_tokens=4
    )
    choice = answer.choices[0]
    verdict = choice.model_extra["saferlhf_guard"]
    assert choice.message.content == REFUSAL and choice.finish_reason == "content_filter"
    assert verdict["status"] == "refused" and verdict["attempts"] == 2 and verdict["flagged"]
    assert len(verdict["severities"]) == 2 and len(verdict["categories"]) == 19
    audit = [json.loads(line) for line in (run_dir / "audit.jsonl").read_text().splitlines()]
    assert any(r["id"] == answer.id and r["status"] == "refused" for r in audit)


def test_moderations_answer_in_openai_shape_with_severity(guarded):
    base_url, _ = guarded
    texts = ["warm up for five minutes .", "lock the maids in a room ."]
    result = client(base_url, TOKEN).moderations.create(model="moderation", input=texts)
    assert len(result.results) == 2
    for item in result.results:
        assert item.flagged
        assert item.model_extra["severity"] in range(4)
    raw = httpx.post(
        f"{base_url}/v1/moderations",
        json={"input": texts[0]},
        headers={"Authorization": f"Bearer {TOKEN}"},
    ).json()["results"][0]
    assert len(raw["categories"]) == len(raw["category_scores"]) == 19


def test_200_concurrent_requests_are_each_answered_once_in_batches(guarded):
    base_url, _ = guarded
    headers = {"Authorization": f"Bearer {TOKEN}"}
    before = httpx.get(f"{base_url}/metrics", headers=headers).json()

    async def load():
        limit = asyncio.Semaphore(16)
        async with httpx.AsyncClient(base_url=base_url, headers=headers, timeout=120) as http:

            async def one(i: int):
                async with limit:
                    body = {"messages": HELLO, "max_tokens": 1 + i % 3, "n": 1 + i % 2}
                    response = await http.post("/v1/chat/completions", json=body)
                    return i, response

            return await asyncio.gather(*(one(i) for i in range(200)))

    results = asyncio.run(load())
    assert sorted(i for i, _ in results) == list(range(200))
    assert all(response.status_code == 200 for _, response in results)
    assert all(len(response.json()["choices"]) == 1 + i % 2 for i, response in results)
    assert len({response.json()["id"] for _, response in results}) == 200
    after = httpx.get(f"{base_url}/metrics", headers=headers).json()
    served = after["requests_by_route"]["/v1/chat/completions"]
    assert served - before["requests_by_route"].get("/v1/chat/completions", 0) == 200
    assert after["mean_batch_size"] > 1
    assert after["refusals_total"] - before["refusals_total"] == sum(1 + i % 2 for i in range(200))


BAD_REQUESTS = {
    "malformed JSON": (b'{"messages": [', 400, "not valid JSON"),
    "not an object": (b"[1, 2]", 400, "JSON object"),
    "a string for max_tokens": ({"messages": HELLO, "max_tokens": "5"}, 400, "max_tokens"),
    "a number for content": ({"messages": [{"role": "user", "content": 5}]}, 400, "content"),
    "no messages": ({"max_tokens": 2}, 400, "messages"),
    "an unsupported field": ({"messages": HELLO, "tools": []}, 400, "tools"),
    "max_tokens over the limit": ({"messages": HELLO, "max_tokens": 9}, 400, "serve.max_tokens"),
    "n over the limit": ({"messages": HELLO, "n": 5}, 400, "serve.max_n"),
    "a prompt too long": (
        {"messages": [{"role": "user", "content": "rice " * 200}]},
        400,
        "serve.max_prompt_tokens",
    ),
    "a body too large": (
        {"messages": [{"role": "user", "content": "x" * 5000}]},
        413,
        "serve.max_body_bytes",
    ),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_a_bad_request_gets_a_4xx_naming_the_field_or_limit(guarded, case):
    base_url, _ = guarded
    body, status, words = BAD_REQUESTS[case]
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=content,
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == status
    error = response.json()["error"]
    assert words in error["message"] and set(error) == {"message", "type", "param", "code"}


def test_a_chunked_body_is_refused_once_it_passes_the_limit(guarded):
    base_url, _ = guarded

    def chunks():
        yield b'{"messages": [{"role": "user", "content": "'
        for _ in range(100):
            yield b"x" * 100
        yield b'"}]}'

    response = httpx.post(
        f"{base_url}/v1/chat/completions",
        content=chunks(),
        headers={"Authorization": f"Bearer {TOKEN}", "Content-Type": "application/json"},
    )
    assert response.status_code == 413
    assert "serve.max_body_bytes" in response.json()["error"]["message"]


@pytest.mark.parametrize("authorization", [None, "Bearer wrong", TOKEN])
def test_a_missing_or_wrong_token_gets_401(guarded, authorization):
    base_url, _ = guarded
    headers = {"Authorization": authorization} if authorization else {}
    response = httpx.post(
        f"{base_url}/v1/chat/completions", json={"messages": HELLO}, headers=headers
    )
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        client(base_url, "wrong").chat.completions.create(model="policy", messages=HELLO)


def test_the_server_is_still_up_after_bad_requests(guarded):
    base_url, _ = guarded
    authorized = {"Authorization": f"Bearer {TOKEN}"}
    httpx.post(f"{base_url}/v1/chat/completions", content=b"{", headers=authorized)
    httpx.post(f"{base_url}/v1/chat/completions", json={"messages": HELLO})
    assert httpx.get(f"{base_url}/health").json()["status"] == "ok"
    statuses = httpx.get(f"{base_url}/metrics", headers=authorized).json()["responses_by_status"]
    assert "500" not in statuses and statuses["400"] >= 1 and statuses["401"] >= 1


def test_a_port_out_of_range_is_refused_naming_the_key(compose_cfg):
    with pytest.raises(ConfigError, match=r"serve\.port=70000"):
        validate_config(compose_cfg("task=serve", "policy_path=x", "serve.port=70000"))


def test_a_missing_policy_folder_is_a_clean_error(compose_cfg, tmp_path):
    cfg = compose_cfg("task=serve", "logger=none", f"policy_path={tmp_path / 'nowhere'}")
    with pytest.raises(ConfigPathError, match="policy_path="):
        run(cfg, tmp_path / "run")


def test_max_tokens_that_leave_no_room_for_a_prompt_are_refused(compose_cfg, artifacts, tmp_path):
    cfg = compose_cfg(
        "task=serve",
        "logger=none",
        f"policy_path={artifacts / 'policy'}",
        "serve.max_tokens=125",
        "model.max_length=128",
    )
    with pytest.raises(ConfigError, match=r"serve\.max_tokens=125: leaves 3 of model\.max_length"):
        run(cfg, tmp_path / "run")


def test_a_taken_port_is_refused_naming_it(compose_cfg, artifacts, tmp_path):
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        cfg = compose_cfg(
            "task=serve", "logger=none", f"policy_path={artifacts / 'policy'}", f"serve.port={port}"
        )
        with pytest.raises(ListenError, match=f"serve.port={port}: cannot listen there"):
            run(cfg, tmp_path / "run")


def test_the_command_reports_a_bad_port_in_one_line(tmp_path):
    result = subprocess.run(
        [SAFERLHF, "task=serve", "logger=none", "serve.port=0", f"hydra.run.dir={tmp_path}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines()[-1].startswith("saferlhf: error: serve.port=0")
