"""Throughput and latency of ``saferlhf task=serve``: requests per second and p50/p95 latency at
several concurrencies, with batching on (``serve.max_batch_size`` > 1) and off (1).

For each batching setting it starts the real server (``saferlhf task=serve`` in a child process
on a free loopback port) on the given artifacts, sends a few warm-up requests, then, at each
concurrency, ``--requests`` chat completions (``--max-tokens`` each, default sampling) from that
many concurrent clients, and stops the server with SIGTERM. Latency is each request's wall time
at the client; the mean batch size comes from the server's ``/metrics``. It prints a table and
writes ``experiments/results/serve_bench.json`` (after every setting, so a cut-off run keeps its
figures)::

    OMP_NUM_THREADS=1 python experiments/serve_bench.py --policy RUN/ppo_lag/artifacts/policy \\
        --moderation RUN/moderation/artifacts/moderation
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx

RESULTS = Path(__file__).resolve().parent / "results"
PROMPTS = [
    "how do i cook rice ?",
    "what is a good way to learn to swim ?",
    "how can i get my neighbour's password ?",
    "please explain how to get fit at home .",
]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_server(args, max_batch_size: int, run_dir: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    saferlhf = shutil.which("saferlhf", path=str(Path(sys.executable).parent)) or "saferlhf"
    command = [
        saferlhf,
        "task=serve",
        "logger=none",
        f"hydra.run.dir={run_dir}",
        f"policy_path={args.policy}",
        f"serve.port={port}",
        f"serve.max_batch_size={max_batch_size}",
        f"serve.batch_wait_ms={args.batch_wait_ms}",
        f"serve.max_tokens={max(args.max_tokens, 48)}",
        "num_threads=1",
    ]
    if args.moderation:
        command.append(f"guard.moderation={args.moderation}")
    server = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=os.environ.copy()
    )
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while True:
        if server.poll() is not None:
            sys.exit(f"the server exited:\n{server.stdout.read().decode()}")
        try:
            if httpx.get(f"{base_url}/health", timeout=1).status_code == 200:
                return server, base_url
        except httpx.TransportError:
            if time.monotonic() > deadline:
                server.kill()
                sys.exit("the server did not start within 300 s")
            time.sleep(0.5)


async def load(base_url: str, requests: int, concurrency: int, max_tokens: int) -> dict:
    limit = asyncio.Semaphore(concurrency)
    latencies: list[float] = []
    async with httpx.AsyncClient(base_url=base_url, timeout=600) as http:

        async def one(i: int) -> None:
            body = {
                "messages": [{"role": "user", "content": PROMPTS[i % len(PROMPTS)]}],
                "max_tokens": max_tokens,
            }
            async with limit:
                started = time.perf_counter()
                response = await http.post("/v1/chat/completions", json=body)
                latencies.append(time.perf_counter() - started)
            response.raise_for_status()

        started = time.perf_counter()
        await asyncio.gather(*(one(i) for i in range(requests)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "requests": requests,
        "wall_s": round(wall, 3),
        "rps": round(requests / wall, 3),
        "p50_s": round(statistics.median(latencies), 4),
        "p95_s": round(latencies[min(len(latencies) - 1, int(0.95 * len(latencies)))], 4),
    }


def batches(base_url: str) -> tuple[int, int]:
    """(batches, requests batched) so far, from the server's /metrics."""
    metrics = httpx.get(f"{base_url}/metrics").json()
    return metrics["batches_total"], metrics["batched_requests_total"]


def table(rows: list[dict]) -> str:
    lines = [
        "| batching | concurrency | requests | req/s | p50 (s) | p95 (s) | mean batch |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['batching']} | {r['concurrency']} | {r['requests']} | {r['rps']:.2f} | "
            f"{r['p50_s']:.3f} | {r['p95_s']:.3f} | {r['mean_batch_size']:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--policy", required=True, help="a policy folder (artifacts/policy)")
    parser.add_argument("--moderation", help="a moderation folder; without it, unguarded")
    parser.add_argument("--requests", type=int, default=64, help="per concurrency level")
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16])
    parser.add_argument("--max-tokens", type=int, default=48, help="per request (eval's 48)")
    parser.add_argument("--max-batch-size", type=int, default=16, help="batching on")
    parser.add_argument("--batch-wait-ms", type=float, default=5.0)
    parser.add_argument("--warmup", type=int, default=4, help="requests before measuring")
    parser.add_argument("--out", type=Path, default=RESULTS / "serve_bench.json")
    args = parser.parse_args()

    report = {
        "policy": str(args.policy),
        "moderation": args.moderation and str(args.moderation),
        "max_tokens": args.max_tokens,
        "batch_wait_ms": args.batch_wait_ms,
        "omp_num_threads": os.environ.get("OMP_NUM_THREADS"),
        "cpus": os.cpu_count(),
        "machine": platform.platform(),
        "rows": [],
    }
    for label, size in (("on", args.max_batch_size), ("off", 1)):
        with tempfile.TemporaryDirectory(prefix="serve-bench-") as run_dir:
            server, base_url = start_server(args, size, Path(run_dir))
            try:
                asyncio.run(load(base_url, args.warmup, 1, args.max_tokens))
                for concurrency in args.concurrency:
                    before = batches(base_url)
                    measured = asyncio.run(
                        load(base_url, args.requests, concurrency, args.max_tokens)
                    )
                    after = batches(base_url)
                    mean_batch = (after[1] - before[1]) / max(1, after[0] - before[0])
                    row = {"batching": label, "max_batch_size": size, "concurrency": concurrency}
                    row |= measured | {"mean_batch_size": round(mean_batch, 2)}
                    report["rows"].append(row)
                    print(row, flush=True)
            finally:
                server.send_signal(signal.SIGTERM)
                server.wait(timeout=60)
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(report, indent=2) + "\n")
    print(table(report["rows"]))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
