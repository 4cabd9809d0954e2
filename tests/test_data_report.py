import json
import subprocess
import sys

import pytest

from saferlhf.cli import run
from saferlhf.run import read_summary
from tests.rows import preference_row

SMALL = ("data.benchmark.num_train=200", "data.benchmark.num_test=50")


@pytest.mark.parametrize(
    "logger, expected",
    [("csv", "csv/version_0/metrics.csv"), ("tensorboard", "tensorboard"), ("none", None)],
)
def test_data_report_writes_summary_config_and_plot(compose_cfg, tmp_path, logger, expected):
    cfg = compose_cfg("task=data_report", f"logger={logger}", *SMALL)
    metrics = run(cfg, tmp_path)
    summary = read_summary(tmp_path)
    assert summary["task"] == "data_report"
    assert (
        summary["metrics"]["data/train_rows"] == 200 and summary["metrics"]["data/test_rows"] == 50
    )
    assert summary["metrics"]["data/skipped_rows"] == 0
    assert summary["metrics"] == pytest.approx(metrics)
    assert 0.0 < summary["metrics"]["data/train/unsafe_fraction"] < 1.0
    # The single label sides with better on some pairs and with safer on others.
    assert 0.2 < summary["metrics"]["data/train/single_agrees_better"] < 1.0
    assert 0.2 < summary["metrics"]["data/train/single_agrees_safer"] < 1.0
    assert (tmp_path / "config.yaml").exists() and "${" not in (
        tmp_path / "config.yaml"
    ).read_text()
    assert (tmp_path / "data_report.png").read_bytes()[:4] == b"\x89PNG"
    report = json.loads((tmp_path / "data_report.json").read_text())
    assert report["splits"]["train"]["harm"]["responses"] > 200
    if expected:
        assert (tmp_path / expected).exists()


def test_wandb_logger_runs_offline_into_the_run_dir(compose_cfg, tmp_path):
    run(compose_cfg("task=data_report", "logger=wandb", *SMALL), tmp_path)
    runs = list((tmp_path / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].glob("*.wandb"))


def _cli(*args, cwd):
    return subprocess.run(
        [sys.executable, "-m", "saferlhf.cli", *args], capture_output=True, text=True, cwd=cwd
    )


@pytest.mark.slow
def test_local_directory_with_bad_rows_skipped_and_reported(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    rows = [preference_row(prompt=f"question {i} ?") for i in range(20)]
    rows[3]["response_0_severity_level"] = 9
    rows[11]["better_response_id"] = "first"
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[15:]))
    run_dir = tmp_path / "run"
    args = (
        "task=data_report",
        "data=local",
        f"data.path={data}",
        "logger=csv",
        f"hydra.run.dir={run_dir}",
    )

    failed = _cli(*args, cwd=tmp_path)
    assert failed.returncode != 0
    assert f"{data / 'train.jsonl'}, row 4, field 'response_0_severity_level'" in failed.stderr

    done = _cli(*args, "data.on_bad_row=skip", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "skipped 2 invalid rows" in done.stdout
    assert f"{data / 'train.jsonl'}, row 12, field 'better_response_id'" in done.stdout
    skipped = [
        json.loads(line) for line in (run_dir / "skipped_rows.jsonl").read_text().splitlines()
    ]
    assert [(s["row"], s["field"]) for s in skipped] == [
        (4, "response_0_severity_level"),
        (12, "better_response_id"),
    ]
    assert read_summary(run_dir)["metrics"]["data/skipped_rows"] == 2


@pytest.mark.slow
def test_multirun_over_two_overrides_gives_one_job_dir_and_wandb_run_each(tmp_path):
    sweep = tmp_path / "sweep"
    result = _cli(
        "-m", "task=data_report", "data.benchmark.seed=0,1", "data.benchmark.label_noise=0.0,0.2",
        *SMALL, f"hydra.sweep.dir={sweep}", cwd=tmp_path,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    summaries = sorted(sweep.glob("*/summary.json"))
    assert len(summaries) == 4
    agreements = {
        json.loads(p.read_text())["metrics"]["data/train/single_agrees_better"] for p in summaries
    }
    assert len(agreements) > 1  # the overrides reached the jobs
    assert len(list(sweep.glob("*/wandb/offline-run-*"))) == 4
    names = [p.parent.name for p in summaries]
    assert sum("label_noise=0.2" in n and "seed=1" in n for n in names) == 1


def test_repeated_rows_and_shared_prompts_reach_the_report_and_metrics(compose_cfg, tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    train = [preference_row(prompt=f"question {i} ?") for i in range(8)]
    train += [train[2], train[2], train[5]]
    test = [preference_row(prompt="question 5 ?"), preference_row(prompt="something new ?")]
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in train))
    (data / "test.jsonl").write_text("".join(json.dumps(r) + "\n" for r in test))
    cfg = compose_cfg("task=data_report", "logger=none", "data=local", f"data.path={data}")
    metrics = run(cfg, tmp_path / "run")
    assert metrics["data/train/duplicate_rows"] == 3 and metrics["data/test/duplicate_rows"] == 0
    assert metrics["data/shared_prompts"] == 1
    repeats = json.loads((tmp_path / "run" / "data_report.json").read_text())["repeats"]
    assert repeats["duplicate_examples"]["train"][0] == (
        f"{data / 'train.jsonl'}, row 9 repeats {data / 'train.jsonl'}, row 3"
    )
    assert repeats["shared_prompt_examples"] == [
        f"{data / 'test.jsonl'}, row 1 has the prompt of {data / 'train.jsonl'}, row 6"
    ]
    assert metrics["data/train_rows"] == 11  # counted, not dropped
