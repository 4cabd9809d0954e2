"""The ``saferlhf`` command's own checks, before Hydra runs."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

from saferlhf.cli import url_with_credentials


def test_a_url_with_a_password_is_found_and_masked():
    overrides = ["task=evaluate", "task.judge.base_url=https://bob:hunter2@judge.example/v1"]
    assert url_with_credentials(overrides) == "task.judge.base_url=https://***@judge.example/v1"
    assert url_with_credentials(["x.base_url='http://alice@host:8000/v1'"]) == (
        "x.base_url=http://***@host:8000/v1"
    )


def test_urls_without_credentials_and_other_values_pass():
    overrides = ["task.judge.base_url=https://judge.example/v1?x=1", "data.path=/a@b", "seed=0"]
    assert url_with_credentials(overrides) is None


def test_the_command_refuses_a_password_before_hydra_writes_the_run_dir(tmp_path: Path):
    command = shutil.which("saferlhf", path=str(Path(sys.executable).parent))
    run_dir = tmp_path / "run"
    result = subprocess.run(
        [
            command,
            "task=evaluate",
            "task.judge.enabled=true",
            "task.judge.base_url=https://bob:hunter2@judge.example/v1",
            f"hydra.run.dir={run_dir}",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        "saferlhf: error: task.judge.base_url=https://***@judge.example/v1 holds a user name or "
        "password, which Hydra would write to the run dir: drop it from the URL (a judge's key "
        "goes in the environment variable task.judge.api_key_env names)"
    ]
    assert not run_dir.exists()
    assert "hunter2" not in result.stdout + result.stderr
