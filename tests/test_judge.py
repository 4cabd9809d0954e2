"""The LLM judge's guards: the key goes in one header to one address, over https unless the
server is this machine or the user allows plain http."""

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from saferlhf.errors import ConfigError, UserError
from saferlhf.evaluate import judge

KEY_ENV = "SAFERLHF_TEST_JUDGE_KEY"
ANSWER = {"choices": [{"message": {"content": '{"helpful": "A", "harmless": "tie"}'}}]}


class Server:
    """A server on 127.0.0.1 that records every request and answers with ``answer(server)``:
    ``(status, headers, body)``."""

    def __init__(self, answer):
        self.requests = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            def _record_and_answer(self):
                length = int(self.headers.get("Content-Length") or 0)
                self.rfile.read(length)
                server.requests.append((self.command, self.path, dict(self.headers)))
                status, headers, body = answer(server)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            do_GET = do_POST = _record_and_answer

            def log_message(self, *args):
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.base_url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()


def _cfg(base_url, **extra):
    return {
        "base_url": base_url,
        "model": "fake-judge",
        "api_key_env": KEY_ENV,
        "allow_insecure_http": False,
        "timeout": 5.0,
        "max_prompts": 8,
    } | extra


def _judge_one(cfg):
    return judge.judge_pair(cfg, ["p"], ["a"], ["b"], seed=0)


def test_a_url_with_credentials_is_refused_without_echoing_them():
    with Server(lambda s: (200, {}, json.dumps(ANSWER).encode())) as server:
        port = server.base_url.split(":")[2].split("/")[0]
        with pytest.raises(ConfigError) as info:
            _judge_one(_cfg(f"http://alice:s3cret@127.0.0.1:{port}/v1"))
    message = str(info.value)
    assert "s3cret" not in message and "alice" not in message
    assert message.startswith(f"task.judge.base_url='http://***@127.0.0.1:{port}/v1' holds")
    assert KEY_ENV in message
    assert server.requests == []  # refused before anything was sent


def test_a_query_string_is_refused():
    with pytest.raises(ConfigError, match=r"base_url='https://judge.example/v1' has a query"):
        judge.check_settings(_cfg("https://judge.example/v1?api_key=s3cret"))


@pytest.mark.parametrize(
    "base_url",
    ["http://10.0.0.7:8000/v1", "http://judge.example/v1", "http://localhost.example.com/v1"],
)
def test_plain_http_to_another_machine_needs_the_opt_in(base_url):
    with pytest.raises(ConfigError, match=r"plain http.*task\.judge\.allow_insecure_http=true"):
        judge.check_settings(_cfg(base_url))
    judge.check_settings(_cfg(base_url, allow_insecure_http=True))


@pytest.mark.parametrize(
    "base_url",
    [
        "https://judge.example/v1",
        "http://localhost:8000/v1",
        "http://127.0.0.1:8000/v1",
        "http://127.1.2.3/v1",
        "http://[::1]:8000/v1",
    ],
)
def test_https_and_this_machine_need_no_opt_in(base_url):
    judge.check_settings(_cfg(base_url))


@pytest.mark.parametrize("base_url", [None, "", "localhost:8000/v1", "ftp://judge.example/v1"])
def test_a_missing_or_unusable_url_names_the_key(base_url):
    with pytest.raises(ConfigError, match=r"task\.judge\.base_url"):
        judge.check_settings(_cfg(base_url))


@pytest.mark.parametrize("code", [301, 302, 303, 307, 308])
def test_redirects_are_not_followed_so_the_key_stays_home(monkeypatch, code):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with Server(lambda s: (200, {}, json.dumps(ANSWER).encode())) as elsewhere:
        target = f"{elsewhere.base_url}/chat/completions"
        with Server(lambda s: (code, {"Location": target}, b"")) as server:
            with pytest.raises(judge.JudgeError) as info:
                _judge_one(_cfg(server.base_url))
    assert elsewhere.requests == []
    assert server.requests[0][2]["Authorization"] == "Bearer s3cret"
    assert f"redirects (HTTP {code}) to '{target}'" in str(info.value)
    assert isinstance(info.value, UserError)


def test_a_good_server_is_judged_with_the_key_in_its_header(monkeypatch):
    monkeypatch.setenv(KEY_ENV, "s3cret")
    with Server(lambda s: (200, {}, json.dumps(ANSWER).encode())) as server:
        result = _judge_one(_cfg(server.base_url))
    ((method, path, headers),) = server.requests
    assert (method, path, headers["Authorization"]) == (
        "POST",
        "/v1/chat/completions",
        "Bearer s3cret",
    )
    assert result.malformed == 0 and len(result.records) == 1
