"""Peak memory of ``saferlhf-moderate`` against input length: it should not grow.

Generates JSONL inputs of 10,000 and 100,000 (prompt, response) lines from the embedded
benchmark, runs the real console script on each as a subprocess under ``/usr/bin/time -v``
(or psutil polling where that is missing), and prints each run's peak RSS and their ratio.
Results go to ``experiments/results/bench_moderate_memory.json``.

    .venv/bin/python experiments/bench_moderate_memory.py                # tiny untrained model
    .venv/bin/python experiments/bench_moderate_memory.py --model outputs/.../artifacts/moderation

Without ``--model`` it trains nothing: it builds a tiny *untrained* moderation folder from
``conf/model/tiny.yaml`` (a tokenizer trained on benchmark text, random weights, thresholds
0.5). Memory does not depend on the weights' values, only on their size and the batch.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "bench_moderate_memory.json"
CLI = Path(sys.executable).parent / "saferlhf-moderate"


def build_untrained_moderator(directory: Path) -> Path:
    """A tiny untrained moderation folder from the real config tree's ``model=tiny``."""
    import torch
    from hydra import compose, initialize_config_dir

    from saferlhf import CONF_DIR
    from saferlhf.config import register_configs
    from saferlhf.data import views
    from saferlhf.data.benchmark import generate_benchmark
    from saferlhf.data.collate import format_conversation
    from saferlhf.models import build_score_model, train_bpe_tokenizer
    from saferlhf.tasks.moderation import export_moderator
    from saferlhf.taxonomy import PKU_SAFERLHF

    register_configs()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny", "task=moderation"])
    rows = generate_benchmark(1000, 0, seed=0, label_noise=0.0, benign_fraction=0.35)["train"]
    texts = [format_conversation(i.prompt, i.response) for i in views.qa_items(rows)]
    tokenizer = train_bpe_tokenizer(
        texts, cfg.model.tokenizer.vocab_size, cfg.model.tokenizer.min_frequency
    )
    torch.manual_seed(0)
    model = build_score_model(cfg.model, tokenizer, num_labels=PKU_SAFERLHF.num_labels)
    return export_moderator(
        model, tokenizer, [0.5] * PKU_SAFERLHF.num_categories, cfg.model.max_length, directory
    )


def write_input(path: Path, num_lines: int, seed: int) -> int:
    """``num_lines`` JSONL lines (both responses of each benchmark row); returns the bytes."""
    from saferlhf.data.benchmark import generate_benchmark

    rows = generate_benchmark((num_lines + 1) // 2, 0, seed, 0.0, 0.35)["train"]
    with path.open("w") as f:
        written = 0
        for row in rows:
            for key in ("response_0", "response_1"):
                if written < num_lines:
                    f.write(json.dumps({"prompt": row["prompt"], "response": row[key]}) + "\n")
                    written += 1
    return path.stat().st_size


def run_with_time(command: list[str], env: dict[str, str]) -> tuple[int, float, int]:
    """(peak RSS in KiB, wall seconds, exit status) via GNU time's "Maximum resident set size"."""
    start = time.perf_counter()
    result = subprocess.run(
        ["/usr/bin/time", "-v", *command], env=env, capture_output=True, text=True
    )
    wall = time.perf_counter() - start
    match = re.search(r"Maximum resident set size \(kbytes\): (\d+)", result.stderr)
    if result.returncode != 0 or match is None:
        raise RuntimeError(f"{command} failed ({result.returncode}): {result.stderr[-2000:]}")
    return int(match.group(1)), wall, result.returncode


def run_with_psutil(command: list[str], env: dict[str, str]) -> tuple[int, float, int]:
    """(peak RSS in KiB, wall seconds, exit status) by polling the process every 10 ms."""
    import psutil

    start = time.perf_counter()
    process = psutil.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0
    while process.poll() is None:
        try:
            peak = max(peak, process.memory_info().rss)
        except psutil.NoSuchProcess:
            break
        time.sleep(0.01)
    wall = time.perf_counter() - start
    if process.returncode != 0:
        raise RuntimeError(f"{command} failed ({process.returncode})")
    return peak // 1024, wall, process.returncode


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a moderation folder (default: build a tiny untrained one)")
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument(
        "--threads", type=int, default=1, help="OMP_NUM_THREADS for the CLI (default 1)"
    )
    args = parser.parse_args()

    measure = run_with_time if shutil.which("/usr/bin/time") else run_with_psutil
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    with tempfile.TemporaryDirectory(prefix="bench-moderate-") as tmp:
        tmp = Path(tmp)
        if args.model:
            model, model_note = Path(args.model), f"given: {args.model}"
        else:
            model = build_untrained_moderator(tmp / "moderation")
            model_note = "tiny UNTRAINED moderation model built from conf/model/tiny.yaml"
        print(f"model: {model_note}")
        print(f"peak RSS by {measure.__name__.removeprefix('run_with_')}, {args.threads} thread(s)")
        runs = []
        for size in args.sizes:
            source, output = tmp / f"input_{size}.jsonl", tmp / f"verdicts_{size}.jsonl"
            input_bytes = write_input(source, size, seed=1)
            command = [
                str(CLI), "--model", str(model), "--input", str(source), "--output", str(output),
                "--batch-size", str(args.batch_size),
            ]  # fmt: skip
            peak_kib, wall, _ = measure(command, env)
            with output.open() as f:
                verdicts = sum(1 for _ in f)
            if verdicts != size:
                raise RuntimeError(f"{size} lines in, {verdicts} verdicts out")
            runs.append(
                {
                    "lines": size,
                    "input_mib": round(input_bytes / 2**20, 2),
                    "peak_rss_mib": round(peak_kib / 1024, 1),
                    "wall_s": round(wall, 1),
                    "lines_per_s": round(size / wall),
                }
            )
            print(
                f"{size:>8,} lines ({runs[-1]['input_mib']:6.2f} MiB in): peak RSS "
                f"{runs[-1]['peak_rss_mib']:7.1f} MiB, {wall:6.1f} s, "
                f"{runs[-1]['lines_per_s']:,} lines/s"
            )
    ratio = runs[-1]["peak_rss_mib"] / runs[0]["peak_rss_mib"]
    print(f"peak RSS ratio {runs[-1]['lines']:,} / {runs[0]['lines']:,} lines: {ratio:.3f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    report = {
        "model": model_note,
        "method": measure.__name__.removeprefix("run_with_"),
        "threads": args.threads,
        "batch_size": args.batch_size,
        "runs": runs,
        "peak_rss_ratio_largest_to_smallest": round(ratio, 3),
    }
    RESULTS.write_text(json.dumps(report, indent=2) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
