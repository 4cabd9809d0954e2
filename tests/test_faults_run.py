"""Faults replayed from the shell with the installed ``saferlhf`` console script: bad config
values, a missing artifact or data path, a diverging run, SIGTERM mid-training, a stale or
cut-off pipeline stage.

A refusal exits 2 with one ``saferlhf: error:`` line on stderr naming the key, no traceback
and no summary or artifact; SIGTERM exits 143 with the command that resumes the run.
"""

import json
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from saferlhf.run import TaskResult, write_atomically, write_run_files
from tests.tiny import ppo_history, save_micro_artifacts

SAFERLHF = Path(sys.executable).with_name("saferlhf")  # the console script of this venv
QUIET = ("logger=none", "num_threads=1", "trainer.enable_progress_bar=false")
TINY_DATA = ("data.benchmark.num_train=64", "data.benchmark.num_test=16")
REFUSED, STOPPED_BY_SIGTERM = 2, 143


def saferlhf(run_dir: Path, *overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(SAFERLHF), *QUIET, *overrides, f"hydra.run.dir={run_dir}"],
        capture_output=True,
        text=True,
        cwd=run_dir.parent,
        timeout=600,
    )


def error_line(result: subprocess.CompletedProcess) -> str:
    """The one ``saferlhf: error:`` line on stderr, once no traceback is found there."""
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    lines = [line for line in result.stderr.splitlines() if line.startswith("saferlhf: error: ")]
    assert len(lines) == 1, result.stderr[-3000:]
    return lines[0]


def assert_nothing_written(run_dir: Path) -> None:
    assert not (run_dir / "summary.json").exists()
    assert not (run_dir / "artifacts").exists()


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory):
    """Untrained micro policy, reward and cost folders, as earlier stages would write them."""
    return save_micro_artifacts(tmp_path_factory.mktemp("artifacts"))


def tiny_ppo(artifacts: Path, *overrides: str) -> tuple[str, ...]:
    return (
        "task=ppo", *TINY_DATA,
        f"init.policy={artifacts / 'policy'}", f"init.reward={artifacts / 'reward'}",
        f"init.cost={artifacts / 'cost'}", "algo.rollout_batch_size=8", "algo.minibatch_size=4",
        "eval.sampling.max_new_tokens=8", "algo.ptx_batch_size=4", "eval.num_prompts=8",
        *overrides,
    )  # fmt: skip


# -- refused before anything loads --------------------------------------------------------------


@pytest.mark.parametrize(
    "overrides, key",
    [
        (["task=ppo", "lagrange.cost_limit=nan"], "lagrange.cost_limit=nan"),
        (["task=ppo", "lagrange.lambda_init=0"], "lagrange.lambda_init=0.0"),
        (["task=ppo", "lagrange.lambda_init=-1"], "lagrange.lambda_init=-1.0"),
        (["task=ppo", "lagrange.window=0"], "lagrange.window=0"),
        (["task=ppo", "algo.iterations=0"], "algo.iterations=0"),
        (["task=ppo", "algo.actor_lr=inf"], "algo.actor_lr=inf"),
        (["task=sft", "task.max_epochs=0"], "task.max_epochs=0"),
        (["task=sft", "task.batch_size=0"], "task.batch_size=0"),
        (["task=reward", "task.batch_size=-1"], "task.batch_size=-1"),
        (["task=generate", "eval.sampling.top_p=1.5"], "eval.sampling.top_p=1.5"),
    ],
)
def test_a_bad_value_is_refused_in_one_line_before_anything_loads(tmp_path, overrides, key):
    run_dir = tmp_path / "run"
    result = saferlhf(run_dir, *overrides)
    assert result.returncode == REFUSED
    assert error_line(result).startswith(f"saferlhf: error: {key}: expected")
    assert not (run_dir / "config.yaml").exists()  # refused before the run dir was written to


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["task=ppo"], "this stage needs init.policy=DIR"),
        (["task=dpo", "init.policy=/no/such/dir"], "init.policy='/no/such/dir' is not a directory"),
        (["task=data_report", "data=local", "data.path=/no/such/dir"], "data.path="),
        # A stage's own override is refused before the first stage trains.
        (['task.stages.0.overrides=["task=sft","task.max_epochs=0"]'], "task.max_epochs=0"),
        (["trainer=deepspeed"], "trainer.strategy=deepspeed_stage_2: PPO runs in one process"),
    ],
)
def test_a_missing_input_or_a_bad_stage_value_is_refused_in_one_line(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = saferlhf(run_dir, *overrides)
    assert result.returncode == REFUSED
    assert message in error_line(result)
    assert_nothing_written(run_dir)
    assert not (run_dir / "sft").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task=ppo", "model.max_length=8"],
            "model.max_length=8: expected a value > eval.sampling.max_new_tokens=48",
        ),
        (
            ["task=generate", "model.max_length=40", "eval.sampling.max_new_tokens=40"],
            "model.max_length=40: expected a value > eval.sampling.max_new_tokens=40",
        ),
        (
            ["task=ppo", "lagrange.lambda_init=8", "lagrange.lambda_max=4"],
            "lagrange.lambda_init=8.0: expected a value <= lagrange.lambda_max=4.0",
        ),
        (
            ["task=ppo", "trainer=deepspeed"],
            "trainer.strategy=deepspeed_stage_2: PPO runs in one process, under DDP or sharded",
        ),
        (
            # A password in the judge's URL is refused before config.yaml could record it.
            [
                "task=evaluate", "+task.policies.sft={dir}", "task.judge.enabled=true",
                "task.judge.base_url=https://me:hunter2@judge.example/v1", "task.judge.model=m",
            ],
            "task.judge.base_url=https://***@judge.example/v1 holds a user name or password",
        ),
    ],
)  # fmt: skip
def test_values_that_cannot_go_together_are_refused_before_anything_loads(
    tmp_path, overrides, message
):
    run_dir = tmp_path / "run"
    result = saferlhf(run_dir, *(o.format(dir=tmp_path) for o in overrides))
    assert result.returncode == REFUSED
    assert error_line(result).startswith(f"saferlhf: error: {message}")
    assert "hunter2" not in result.stderr
    assert not (run_dir / "config.yaml").exists()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (
            ["task=ppo", "preference=single", "lagrange=fixed"],
            "lagrange=fixed needs a cost model, which preference=single has not",
        ),
        (["task=ppo", "algo.adam_betas=[0.9]"], "algo.adam_betas=[0.9]: expected two values"),
        (["task=cost", "preference=single"], "task=cost needs dual-preference data"),
        (["task=cost", "task.corrupted_pairs=0.25"], "task.corrupted_pairs=0.25 is for reward"),
        (
            ["task=dpo", "init.policy={dir}", "task.dual_rule=helpful_first"],
            "task.dual_rule='helpful_first': expected one of",
        ),
        (["task=evaluate_score", "model_path={dir}"], "model_path='{dir}': expected a saved"),
        (
            ["task=evaluate", "+task.policies.sft={dir}", "task.prompts_file={dir}/none.jsonl"],
            "task.prompts_file='{dir}/none.jsonl': no such file",
        ),
        (["task=reward", *TINY_DATA, "model.tokenizer=null"], "model.tokenizer is required"),
    ],
)
def test_a_setting_the_task_cannot_use_is_refused_in_one_line(tmp_path, overrides, message):
    run_dir = tmp_path / "run"
    result = saferlhf(run_dir, *(o.format(dir=tmp_path) for o in overrides))
    assert result.returncode == REFUSED
    assert message.format(dir=tmp_path) in error_line(result)
    assert_nothing_written(run_dir)


def test_a_multirun_runs_every_job_and_exits_non_zero_when_one_was_refused(tmp_path):
    result = subprocess.run(
        [
            str(SAFERLHF), "-m", *QUIET, "task=data_report", "task.plot=false",
            "data.benchmark.num_test=10", "data.benchmark.num_train=0,20",
            f"hydra.sweep.dir={tmp_path / 'sweep'}",
        ],
        capture_output=True, text=True, cwd=tmp_path, timeout=600,
    )  # fmt: skip
    assert result.returncode == REFUSED and "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("saferlhf: error:")]
    assert (
        errors[0].startswith("saferlhf: error: job 0 (")
        and "data.benchmark.num_train=0," in errors[0]
    )
    assert errors[0].endswith("data.benchmark.num_train=0: expected a value >= 1")
    assert errors[1].startswith("saferlhf: error: 1 job(s) refused: ") and len(errors) == 2
    (finished,) = (tmp_path / "sweep").glob("1_*/summary.json")
    assert json.loads(finished.read_text())["metrics"]["data/train_rows"] == 20


# -- non-finite training stops the run ----------------------------------------------------------


def test_a_diverging_fit_stops_naming_the_step_with_nothing_written(tmp_path):
    run_dir = tmp_path / "run"
    result = saferlhf(
        run_dir, "task=sft", *TINY_DATA, "task.batch_size=16", "task.max_epochs=2",
        "task.checkpoint_every_n_steps=1", "task.lr=1e30",
    )  # fmt: skip
    assert result.returncode == REFUSED
    line = error_line(result)
    # The loss, or the weights of a checkpoint about to be written, whichever goes first.
    assert "epoch 1, training step" in line and "training went non-finite (" in line
    assert_nothing_written(run_dir)
    for checkpoint in (run_dir / "checkpoints").glob("*.ckpt"):  # those from before it diverged
        weights = torch.load(checkpoint, weights_only=True)["state_dict"].values()
        assert all(torch.isfinite(w).all() for w in weights), checkpoint


def test_a_diverging_ppo_run_stops_naming_the_iteration_with_nothing_written(tmp_path, artifacts):
    run_dir = tmp_path / "run"
    overrides = tiny_ppo(artifacts, "algo.iterations=3", "task.checkpoint_every=1")
    result = saferlhf(run_dir, *overrides, "algo.actor_lr=1e30")
    assert result.returncode == REFUSED
    line = error_line(result)
    assert "PPO iteration 1: training went non-finite (train/actor_loss=nan" in line
    assert_nothing_written(run_dir)
    assert not (run_dir / "checkpoints").exists() and not (run_dir / "ppo_history.json").exists()


# -- SIGTERM ----------------------------------------------------------------------------------


def _terminate_once_training_checkpointed(
    run_dir: Path, overrides, stage_dir: str = "."
) -> subprocess.CompletedProcess:
    """Start a run, send it SIGTERM once the first periodic checkpoint of its ``stage_dir``
    exists, wait for it."""
    command = [str(SAFERLHF), *QUIET, *overrides, f"hydra.run.dir={run_dir}"]
    process = subprocess.Popen(
        command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=run_dir.parent
    )
    deadline = time.monotonic() + 600
    while not (run_dir / stage_dir / "checkpoints" / "last.ckpt").exists():
        assert process.poll() is None, process.communicate()[1][-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = process.communicate(timeout=600)
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


@pytest.mark.slow
def test_sigterm_mid_ppo_exits_143_and_the_printed_command_resumes_it_exactly(tmp_path, artifacts):
    overrides = tiny_ppo(artifacts, "algo.iterations=10", "task.checkpoint_every=1")
    stopped = _terminate_once_training_checkpointed(tmp_path / "cut", overrides)
    assert stopped.returncode == STOPPED_BY_SIGTERM
    line = error_line(stopped)
    assert f"stopped by SIGTERM; it resumes from {tmp_path / 'cut' / 'checkpoints'}" in line
    assert_nothing_written(tmp_path / "cut")

    assert line.endswith(f"hydra.run.dir={tmp_path / 'cut'} ckpt_path=last")
    resumed = _resume(tmp_path, stopped)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    whole = saferlhf(tmp_path / "whole", *overrides)
    assert whole.returncode == 0, whole.stderr[-3000:]
    assert len(ppo_history(tmp_path / "cut")) == 10
    assert ppo_history(tmp_path / "cut") == ppo_history(tmp_path / "whole")


def test_sigterm_mid_fit_exits_143_with_a_checkpoint_and_no_summary(tmp_path):
    overrides = (
        "task=sft", "data.benchmark.num_train=400", "data.benchmark.num_test=16",
        "task.batch_size=8", "task.max_epochs=5", "task.checkpoint_every_n_steps=2",
    )  # fmt: skip
    stopped = _terminate_once_training_checkpointed(tmp_path / "run", overrides)
    assert stopped.returncode == STOPPED_BY_SIGTERM
    assert "ckpt_path=last" in error_line(stopped)
    assert_nothing_written(tmp_path / "run")
    state = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt", weights_only=False)
    assert state["optimizer_states"] and state["global_step"] > 0  # the full state, to resume


def _resume(tmp_path: Path, stopped: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    """Run the command that the SIGTERM message prints."""
    command = shlex.split(error_line(stopped).split(" with: ", 1)[1])
    assert command[0] == "saferlhf" and command[-1] == "ckpt_path=last"
    return subprocess.run(
        [str(SAFERLHF), *command[1:]], capture_output=True, text=True, cwd=tmp_path, timeout=600
    )


@pytest.mark.slow
@pytest.mark.parametrize("workers", [1, 2], ids=["in_order", "side_by_side"])
def test_sigterm_mid_pipeline_stage_resumes_that_stage_with_the_printed_command(tmp_path, workers):
    stages = (
        'task.stages=[{name:sft,overrides:["task=sft","task.max_epochs=3","task.batch_size=8",'
        '"task.checkpoint_every_n_steps=2"]},'
        '{name:report,overrides:["task=data_report","task.plot=false"]}]'
    )
    overrides = (
        stages, "data.benchmark.num_train=200", "data.benchmark.num_test=16",
        f"task.workers={workers}",
    )  # fmt: skip
    stopped = _terminate_once_training_checkpointed(tmp_path / "run", overrides, "sft")
    assert stopped.returncode == STOPPED_BY_SIGTERM
    assert f"it resumes from {tmp_path / 'run' / 'sft' / 'checkpoints'}" in error_line(stopped)
    assert not (tmp_path / "run" / "sft" / "summary.json").exists()
    resumed = _resume(tmp_path, stopped)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "stage sft: resuming it from its last.ckpt" in resumed.stdout + resumed.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["metrics"]["report/data/train_rows"] == 200


# -- pipeline stages reused only when their config matches --------------------------------------


@pytest.mark.slow
def test_a_pipeline_stage_reruns_when_its_config_changed_or_its_summary_is_cut_off(tmp_path):
    report_stage = 'task.stages=[{name:report,overrides:["task=data_report","task.plot=false"]}]'

    def pipeline(num_train: int) -> tuple[str, dict]:
        result = saferlhf(
            tmp_path / "run", report_stage, f"data.benchmark.num_train={num_train}",
            "data.benchmark.num_test=10",
        )  # fmt: skip
        assert result.returncode == 0, result.stderr[-3000:]
        summary = json.loads((tmp_path / "run" / "report" / "summary.json").read_text())
        return result.stdout + result.stderr, summary["metrics"]

    pipeline(20)
    log, metrics = pipeline(30)
    assert "data.benchmark.num_train: 20 then, 30 now" in log
    assert metrics["data/train_rows"] == 30
    summary = tmp_path / "run" / "report" / "summary.json"
    summary.write_text(summary.read_text()[:40])  # as a crash mid-write would have left it
    log, metrics = pipeline(30)
    assert "summary.json is cut off or not JSON" in log and metrics["data/train_rows"] == 30
    log, _ = pipeline(30)
    assert "stage report already done" in log


# -- summary.json ---------------------------------------------------------------------------------


def test_summary_is_strict_json_with_an_undefined_metric_as_null(compose_cfg, tmp_path):
    result = TaskResult({"gold/helpfulness": float("nan"), "accuracy": 0.5}, {"policy": "P"})
    write_run_files(compose_cfg("task=sft"), tmp_path, result)

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    summary = json.loads((tmp_path / "summary.json").read_text(), parse_constant=refuse)
    assert summary["metrics"] == {"gold/helpfulness": None, "accuracy": 0.5}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "summary.json"]


def test_a_write_that_fails_leaves_the_old_file_whole(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    write_atomically(path, '{"old": 1}\n')

    def fail(*_):
        raise OSError("disk full")

    monkeypatch.setattr("saferlhf.run.os.replace", fail)
    with pytest.raises(OSError, match="disk full"):
        write_atomically(path, '{"new": 2}\n')
    assert path.read_text() == '{"old": 1}\n' and [p.name for p in tmp_path.iterdir()] == [
        path.name
    ]
