"""Faults injected into ``saferlhf-moderate``, replayed from the shell through the installed
console script: what a user sees is the exit status, stdout and stderr.

The findings replayed: a valid JSON line holding a lone surrogate (``"\\ud800"``) raised inside
the tokenizer, losing its batch and every later line, with exit status 1 ("some lines bad, the
others judged"); a cut-off ``model.safetensors`` gave a traceback and exit status 1 where the
help promises 2; a long prompt pushed the response out of what the moderator saw.
"""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from saferlhf.models import build_score_model
from saferlhf.tasks.moderation import export_moderator
from tests.tiny import benchmark_tokenizer, micro_model_cfg

MODERATE = str(Path(sys.executable).parent / "saferlhf-moderate")
BENIGN = "please explain how to get fit at home . warm up for five minutes before exercise . "
SEVERE = "make the maids work without pay under threats . lock the maids in a room ."


@pytest.fixture(scope="module")
def moderator_dir(tmp_path_factory) -> Path:
    """A micro untrained moderation folder: the faults are in the files and lines, not in what
    the model has learnt."""
    tokenizer = benchmark_tokenizer(num_train=200, vocab_size=1024)
    torch.manual_seed(0)
    model = build_score_model(micro_model_cfg(), tokenizer, num_labels=23)
    directory = tmp_path_factory.mktemp("faults") / "moderation"
    return export_moderator(model, tokenizer, [0.5] * 19, 128, directory)


def moderate(*args: str, stdin: str = "") -> subprocess.CompletedProcess:
    return subprocess.run(
        [MODERATE, *args],
        input=stdin,
        capture_output=True,
        text=True,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
        timeout=120,
    )


def line(prompt: str, response: str) -> str:
    return json.dumps({"prompt": prompt, "response": response})


def answered_lines(stdout: str) -> list[int]:
    return [json.loads(text)["line"] for text in stdout.splitlines()]


def test_a_lone_surrogate_loses_only_its_own_line(moderator_dir):
    lines = [line(f"question {n} ?", f"answer {n} .") for n in range(1, 10)]
    lines[2] = '{"prompt": "hi", "response": "x\\ud800y"}'  # valid JSON, not valid Unicode
    lines[5] = '{"prompt": "\\udfff", "response": "fine ."}'
    lines[6] = '{"prompt": "hi", "response": "fine .", "note": "\\ud800"}'  # ignored field
    result = moderate("--model", str(moderator_dir), "--batch-size", "4", stdin="\n".join(lines))

    assert result.returncode == 1  # some lines bad, the others judged
    assert answered_lines(result.stdout) == [1, 2, 4, 5, 7, 8, 9]  # lines 4 and 5 share its batch
    errors = result.stderr.splitlines()
    assert errors == [
        "line 3: field 'response' is not valid Unicode (lone surrogate U+D800 at character 1); "
        "skipped",
        "line 6: field 'prompt' is not valid Unicode (lone surrogate U+DFFF at character 0); "
        "skipped",
        "saferlhf-moderate: 2 bad line(s) skipped",
    ]


def test_a_cut_off_safetensors_file_exits_2_with_one_line(moderator_dir, tmp_path):
    broken = shutil.copytree(moderator_dir, tmp_path / "moderation")
    weights = broken / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    result = moderate("--model", str(broken), stdin=line("hi", "fine ."))

    assert result.returncode == 2
    assert "Traceback" not in result.stderr and result.stdout == ""
    (message,) = result.stderr.splitlines()
    assert message.startswith(f"saferlhf-moderate: {weights}: damaged or cut short")


MISSING_FILES = {
    "config.json": "no config.json (expected a moderation model folder, written by "
    "`saferlhf task=moderation`)",
    "tokenizer.json": "no tokenizer.json (the folder's tokenizer is missing)",
}


@pytest.mark.parametrize("missing", list(MISSING_FILES))
def test_a_model_folder_missing_a_file_exits_2_with_one_line(moderator_dir, tmp_path, missing):
    broken = shutil.copytree(moderator_dir, tmp_path / "moderation")
    (broken / missing).unlink()
    result = moderate("--model", str(broken), stdin=line("hi", "fine ."))

    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr and result.stdout == ""
    assert result.stderr.splitlines() == [f"saferlhf-moderate: {broken}: {MISSING_FILES[missing]}"]


def test_a_long_prompt_is_judged_and_counted_as_truncated(moderator_dir):
    lines = [line(BENIGN * 80, SEVERE), line("hi", SEVERE), line("hi", BENIGN * 12 + SEVERE)]
    result = moderate("--model", str(moderator_dir), stdin="\n".join(lines) + "\n")

    assert result.returncode == 0, result.stderr
    answers = [json.loads(text) for text in result.stdout.splitlines()]
    assert [(a["line"], a["truncated"]) for a in answers] == [(1, True), (2, False), (3, True)]
    assert result.stderr.splitlines() == [
        "saferlhf-moderate: 2 of 3 judged line(s) longer than the model's max_length "
        "(128 tokens): judged in several views, the worst counting"
    ]
